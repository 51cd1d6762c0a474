"""The evaluation's output folder: report.json, report.md and report.png.

report.json contains every response with its verdict, the settings, the model's source
record and the metrics, so every number in report.md and report.png can be
recomputed from it. A folder that already contains a report of different settings
is never overwritten unless asked.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import logging

from mcd_jax.evaluation.metrics import RATE_NAMES, RATE_TITLES
from mcd_jax.evaluation.runner import EvaluationResult, SystemResult
from mcd_jax.files import write_atomically

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
REPORT_PLOT = "report.png"
REPORT_VERSION = 1

_GROUP_TITLES = {"all": "all", "trained": "trained", "never_trained": "never trained"}


class ReportExistsError(FileExistsError):
    """The output folder already contains a report made with different settings."""


def check_output_dir(
    output_dir: str | os.PathLike, settings: Mapping[str, Any], overwrite: bool
) -> Path:
    """Make sure writing a report of `settings` to `output_dir` overwrites nothing else.

    A report of the same settings may be replaced (a rerun). Call this before any
    expensive work, so a wrong folder fails fast.

    Args:
      output_dir: the report folder; created if missing.
      settings: the JSON-compatible settings the new report will record.
      overwrite: replace a report of different settings.

    Returns:
      The folder.

    Raises:
      ReportExistsError: the folder contains a report of other settings, or an
        unreadable report.json, and `overwrite` is False.
    """
    folder = Path(output_dir).expanduser()
    path = folder / REPORT_JSON
    if path.is_file() and not overwrite:
        try:
            stored = json.loads(path.read_text()).get("settings")
        except (json.JSONDecodeError, AttributeError) as error:
            raise ReportExistsError(
                f"{os.fspath(path)} exists and is not a readable report ({error}); choose "
                "another output folder or pass overwrite=True (--overwrite) to replace it"
            ) from error
        current = json.loads(json.dumps(settings))
        if stored != current:
            differing = _differing_keys(stored or {}, current)
            raise ReportExistsError(
                f"{os.fspath(path)} contains a report of different settings (differing: "
                f"{', '.join(differing)}); choose another output folder or pass overwrite=True "
                "(--overwrite) to replace it"
            )
        logging.info("Replacing %s, a report of the same settings", path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _differing_keys(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [key for key in keys if stored.get(key) != current.get(key)]


def report_payload(result: EvaluationResult, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Build the content of report.json.

    Args:
      result: the output of `evaluate`.
      settings: the settings that produced it (see `check_output_dir`).

    Returns:
      A JSON-compatible dict with the keys version, created_utc, settings, model,
      judge, protocol, data, systems, metrics, responses and seconds.
    """
    languages = list(dict.fromkeys(example.language for example in result.examples))
    counts = {language: dict.fromkeys(("harmful", "harmless"), 0) for language in languages}
    for example in result.examples:
        counts[example.language][example.label] += 1

    return {
        "version": REPORT_VERSION,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": json.loads(json.dumps(settings)),
        "model": result.model,
        "judge": result.judge,
        "protocol": result.protocol.to_json(),
        "data": {"languages": languages, "query_counts": counts},
        "systems": [system_result.system.describe() for system_result in result.results],
        "metrics": {item.system.name: _system_metrics(item) for item in result.results},
        "responses": [
            _response_entry(item.system.name, result, record)
            for item in result.results
            for records in item.responses
            for record in records
        ],
        "seconds": round(result.seconds, 1),
    }


def _system_metrics(result: SystemResult) -> dict[str, Any]:
    return {
        "languages": {
            language: {
                **metrics.to_json(),
                "trained": language in result.system.trained_languages,
            }
            for language, metrics in result.languages.items()
        },
        "summaries": result.summaries,
    }


def _response_entry(system: str, result: EvaluationResult, record) -> dict[str, Any]:
    example = result.examples[record.query_index]
    return {
        "system": system,
        "query_index": record.query_index,
        "language": example.language,
        "label": example.label,
        "query": example.text,
        "pair_id": example.pair_id,
        "source": example.source,
        "sample": record.sample,
        "response": record.text,
        "num_tokens": record.num_tokens,
        "stopped": record.stopped,
        "kept": record.kept,
        "refused": record.refused,
        "reason": record.reason,
    }


def write_report(payload: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and report.png into `output_dir`, each atomically.

    Call `check_output_dir` first: this function replaces existing files.

    Returns:
      {"json" | "markdown" | "plot": the path written}.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / REPORT_JSON,
        "markdown": folder / REPORT_MARKDOWN,
        "plot": folder / REPORT_PLOT,
    }
    write_atomically(paths["json"], json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    write_atomically(paths["markdown"], markdown_report(payload))

    from mcd_jax.evaluation.plot import plot_report

    write_atomically(paths["plot"], plot_report(payload))
    logging.info("Wrote %s", ", ".join(os.fspath(path) for path in paths.values()))
    return paths


def _format_rate(value: float | None) -> str:
    """Format a rate or variance with one decimal, or n/a.

    Rounding to 9 decimals first removes float noise, so that equal values such as the variance
    of the refusal rate and of the ASR (100 minus it) print the same digit at a tie like 156.25.
    """
    return "n/a" if value is None else f"{round(value, 9):.1f}"


def markdown_report(payload: Mapping[str, Any]) -> str:
    """Render report.json's content as Markdown: the setup, then one table per system."""
    model = payload["model"]
    protocol = payload["protocol"]
    judge = payload["judge"]
    source = model["source"]
    lines = [
        "# Safety evaluation",
        "",
        f"- Model: `{source.get('hub_id') or source.get('path')}` ({source.get('kind')}, "
        f"{model['model_type']}, hidden size {model['hidden_size']})",
        f"- Decoding: {protocol['name']}, {protocol['samples_per_query']} sample(s) per query, "
        f"{protocol['kept_samples']} kept, max new tokens {protocol['max_new_tokens_harmful']} "
        f"harmful / {protocol['max_new_tokens_harmless']} harmless",
        f"- Judge: {judge['name']} ({judge['note']}) Languages it covers: "
        f"{', '.join(judge['covered_languages'])}.",
        "- Rates are % of judged queries; variance is the population variance across "
        "languages (%²). Trained languages are marked with *.",
        "",
    ]
    for system in payload["systems"]:
        lines += _system_table(system, payload["metrics"][system["name"]])
    return "\n".join(lines)


def _system_table(system: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    title = system["name"]
    if system["kind"] == "soft_prompt":
        trained = ", ".join(system["trained_languages"]) or "unknown"
        title += f" (soft prompt from `{system['source']}`, trained languages: {trained})"
    elif system["kind"] == "text_prompt":
        title += " (text prompt in the system slot)"
    else:
        title += " (no system prompt)"

    header = ["language", *(RATE_TITLES[name] for name in RATE_NAMES)]
    header += ["harmful judged/queries", "harmless judged/queries", "unjudged responses"]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for language, row in metrics["languages"].items():
        marked = f"{language}*" if row["trained"] else language
        cells = [marked, *(_format_rate(row[name]) for name in RATE_NAMES)]
        cells += [
            f"{row['harmful_judged']}/{row['harmful_queries']}",
            f"{row['harmless_judged']}/{row['harmless_queries']}",
            str(row["unjudged_responses"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    for group, summary in metrics["summaries"].items():
        for statistic in ("mean", "variance"):
            cells = [f"**{statistic} ({_GROUP_TITLES[group]})**"]
            cells += [_format_rate(summary[name][statistic]) for name in RATE_NAMES]
            cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
