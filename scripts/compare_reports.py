"""Print the systems of an evaluation report side by side, one Markdown table per rate.

    python scripts/compare_reports.py checkpoints/results/builtin/report.json

Each table has one row per language and one column per system. A cell is marked * where that
system's soft prompt was trained on the language. The last rows are the mean and the variance
across all languages, and, for systems with known training languages, across the trained and
the never-trained ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RATES = {
    "harmful_refusal_rate": "Harmful refusal %",
    "false_refusal_rate": "False refusal % (harmless queries)",
}
GROUPS = {"all": "all", "trained": "trained", "never_trained": "never trained"}


def _cell(value: float | None, trained: bool = False) -> str:
    if value is None:
        return "n/a"
    # Rounded as report.md rounds, so that equal values print equal digits.
    return f"{round(value, 9):.1f}{'*' if trained else ''}"


def comparison_tables(payload: dict) -> str:
    """Return the side-by-side tables of one report.json payload as Markdown."""
    metrics = payload["metrics"]
    systems = [system["name"] for system in payload["systems"]]
    languages = list(next(iter(metrics.values()))["languages"])
    lines = []
    for rate, title in RATES.items():
        lines += [f"**{title}**", "", "| language | " + " | ".join(systems) + " |"]
        lines.append("|---|" + "---|" * len(systems))
        for language in languages:
            cells = []
            for system in systems:
                row = metrics[system]["languages"][language]
                cells.append(_cell(row[rate], row["trained"]))
            lines.append(f"| {language} | " + " | ".join(cells) + " |")
        for group, group_title in GROUPS.items():
            for statistic in ("mean", "variance"):
                cells = []
                for system in systems:
                    summary = metrics[system]["summaries"].get(group)
                    cells.append("" if summary is None else _cell(summary[rate][statistic]))
                if any(cells):
                    name = f"**{statistic} ({group_title})**"
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


USAGE = "usage: python scripts/compare_reports.py REPORT.json [REPORT.json ...]"


def _read_report(path: str) -> dict:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{path}: not a readable JSON file ({error}).\n{USAGE}") from error
    if not isinstance(payload, dict) or not {"metrics", "systems"} <= payload.keys():
        raise SystemExit(
            f"{path}: no 'metrics' and 'systems' keys, so it is not a report.json written by "
            "launch/evaluate.py."
        )
    return payload


def main(paths: list[str]) -> None:
    if not paths or any(path in ("-h", "--help") for path in paths):
        raise SystemExit(USAGE)
    for path in paths:
        payload = _read_report(path)
        print(f"### {path}\n")
        print(comparison_tables(payload))


if __name__ == "__main__":
    main(sys.argv[1:])
