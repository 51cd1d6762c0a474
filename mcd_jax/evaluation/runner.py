"""Generate, judge and score every system on every query: the core of the evaluation job."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from jax.sharding import Mesh

from mcd_jax.data.schema import LABELS, Example
from mcd_jax.evaluation.metrics import (
    LanguageMetrics,
    ResponseRecord,
    language_metrics,
    query_outcome,
    summarize_languages,
)
from mcd_jax.evaluation.protocol import DecodingProtocol, kept_sample_mask
from mcd_jax.evaluation.systems import EvaluatedSystem, chat_template_sha256
from mcd_jax.generation import default_stop_token_ids, generate
from mcd_jax.judge import KeywordRefusalJudge, RefusalJudge
from mcd_jax.models.loading import LoadedModel

JUDGE_NOTE = (
    "The refusal judge stands in for the reference's keyword list and its Llama-Guard-2 "
    "'unsafe' check: every non-refused response to a harmful query counts as unsafe."
)


@dataclasses.dataclass
class SystemResult:
    """Every response of one system and the metrics derived from them.

    Attributes:
      system: the evaluated system.
      responses: per query index, that query's responses in sample order.
      languages: per-language metrics, in the order languages first appear.
      summaries: {"all" | "trained" | "never_trained": the mean and variance of
        each rate over those languages}; "trained" and "never_trained" only for
        a system with training languages.
    """

    system: EvaluatedSystem
    responses: list[list[ResponseRecord]]
    languages: dict[str, LanguageMetrics]
    summaries: dict[str, dict[str, dict[str, float | int | None]]]


@dataclasses.dataclass
class EvaluationResult:
    """The outcome of `evaluate`, ready to be written as a report.

    Attributes:
      examples: the evaluated queries; response records refer to them by index.
      results: one per system, in the order given.
      protocol: the decoding protocol.
      judge: the judge's class name, covered languages and a note on its role.
      model: the model's source record, architecture, hidden size and template hash.
      seconds: wall-clock time of generation and judging.
    """

    examples: list[Example]
    results: list[SystemResult]
    protocol: DecodingProtocol
    judge: dict[str, Any]
    model: dict[str, Any]
    seconds: float


def evaluate(
    loaded: LoadedModel,
    systems: Sequence[EvaluatedSystem],
    examples: Sequence[Example],
    *,
    protocol: DecodingProtocol,
    judge: RefusalJudge | None = None,
    batch_size: int = 16,
    mesh: Mesh | None = None,
) -> EvaluationResult:
    """Generate responses for every system and query, judge them and compute the metrics.

    Args:
      loaded: the model, its tokenizer (with a chat template) and its source record.
      systems: the systems to compare; display names must be unique.
      examples: the harmful and harmless queries, in any languages.
      protocol: how responses are generated and scored.
      judge: the refusal judge; defaults to `KeywordRefusalJudge()`.
      batch_size: rows per generation batch (a multiple of the mesh's data x fsdp).
      mesh: a ("data", "fsdp", "tensor") mesh, or None for one device.

    Returns:
      The responses, verdicts and per-language metrics of every system.

    Raises:
      ValueError: no systems or examples, or duplicate system names.
    """
    _check_inputs(systems, examples)
    judge = judge or KeywordRefusalJudge()
    _warn_uncovered_languages(judge, examples)
    stop_token_ids = default_stop_token_ids(loaded.tokenizer)

    start = time.perf_counter()
    results = []
    for system in systems:
        logging.info(
            "Evaluating system %s (%s) on %d queries", system.name, system.kind, len(examples)
        )
        system_start = time.perf_counter()
        responses = _generate_responses(
            loaded, system, examples, protocol, stop_token_ids, batch_size, mesh
        )
        responses = _judge_responses(judge, examples, responses)
        result = _score(system, examples, responses, protocol)
        results.append(result)
        logging.info(
            "System %s done in %.1f s: %s",
            system.name,
            time.perf_counter() - system_start,
            _summary_line(result),
        )

    return EvaluationResult(
        examples=list(examples),
        results=results,
        protocol=protocol,
        judge={
            "name": type(judge).__name__,
            "covered_languages": sorted(judge.covered_languages),
            "note": JUDGE_NOTE,
        },
        model={
            "source": dict(loaded.source),
            "model_type": loaded.config.model_type,
            "hidden_size": loaded.config.hidden_size,
            "chat_template_sha256": chat_template_sha256(loaded.tokenizer),
        },
        seconds=time.perf_counter() - start,
    )


def _check_inputs(systems: Sequence[EvaluatedSystem], examples: Sequence[Example]) -> None:
    if not systems:
        raise ValueError("no systems to evaluate; pass at least one, e.g. builtin_system('none')")
    if not examples:
        raise ValueError("no queries to evaluate on; check the dataset and language selection")
    names = [system.name for system in systems]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"system names must be unique; {duplicates} appear more than once")


def _warn_uncovered_languages(judge: RefusalJudge, examples: Sequence[Example]) -> None:
    languages = dict.fromkeys(example.language.partition("-")[0] for example in examples)
    uncovered = [code for code in languages if code not in judge.covered_languages]
    if uncovered:
        logging.warning(
            "The judge %s does not cover %s: their responses will be unjudged and their rates "
            "empty",
            type(judge).__name__,
            ",".join(uncovered),
        )


def _generate_responses(
    loaded: LoadedModel,
    system: EvaluatedSystem,
    examples: Sequence[Example],
    protocol: DecodingProtocol,
    stop_token_ids: tuple[int, ...],
    batch_size: int,
    mesh: Mesh | None,
) -> list[list[ResponseRecord]]:
    """Generate `protocol.samples_per_query` responses per query, labels in separate runs.

    Harmful and harmless queries have different maximum lengths, so each label is
    one `generate` call. The verdicts are filled in later by `_judge_responses`.
    """
    samples = protocol.samples_per_query
    responses: list[list[ResponseRecord]] = [[] for _ in examples]
    for label in LABELS:
        indices = [index for index, example in enumerate(examples) if example.label == label]
        if not indices:
            continue
        queries = [examples[index].text for index in indices for _ in range(samples)]
        generated = generate(
            loaded.model,
            loaded.tokenizer,
            queries,
            sampling=protocol.sampling_config(label, stop_token_ids),
            text_prompt=system.text_prompt,
            soft_prompt=system.soft_prompt,
            placement=system.placement,
            batch_size=batch_size,
            mesh=mesh,
        )
        for position, index in enumerate(indices):
            rows = range(position * samples, (position + 1) * samples)
            num_tokens = [len(generated.token_ids[row]) for row in rows]
            kept = kept_sample_mask(num_tokens, protocol.kept_samples)
            responses[index] = [
                ResponseRecord(
                    query_index=index,
                    sample=sample,
                    text=generated.texts[row],
                    num_tokens=num_tokens[sample],
                    stopped=generated.stopped[row],
                    kept=kept[sample],
                    refused=None,
                    reason="not judged yet",
                )
                for sample, row in enumerate(rows)
            ]
    return responses


def _judge_responses(
    judge: RefusalJudge, examples: Sequence[Example], responses: list[list[ResponseRecord]]
) -> list[list[ResponseRecord]]:
    flat = [record for records in responses for record in records]
    languages = [examples[record.query_index].language for record in flat]
    verdicts = iter(judge.judge([record.text for record in flat], languages))
    judged = []
    for records in responses:
        row = []
        for record in records:
            verdict = next(verdicts)
            row.append(dataclasses.replace(record, refused=verdict.refused, reason=verdict.reason))
        judged.append(row)
    return judged


def _score(
    system: EvaluatedSystem,
    examples: Sequence[Example],
    responses: list[list[ResponseRecord]],
    protocol: DecodingProtocol,
) -> SystemResult:
    by_language: dict[str, list] = {}
    for example, records in zip(examples, responses, strict=True):
        outcome = query_outcome(example.label, records, protocol.min_success_lines)
        by_language.setdefault(example.language, []).append((example.label, outcome))
    metrics = {language: language_metrics(outcomes) for language, outcomes in by_language.items()}
    return SystemResult(
        system=system,
        responses=responses,
        languages=metrics,
        summaries=language_groups_summary(metrics, system.trained_languages),
    )


def language_groups_summary(
    metrics: Mapping[str, LanguageMetrics], trained_languages: Sequence[str]
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Summarize the rates over all languages, and over trained and never-trained ones.

    Args:
      metrics: per-language metrics of one system.
      trained_languages: the system's training languages; empty for none.

    Returns:
      {"all": ..., "trained": ..., "never_trained": ...} as `summarize_languages`
      returns, the last two only when `trained_languages` is not empty.
    """
    languages = list(metrics)
    summaries = {"all": summarize_languages(metrics, languages)}
    if trained_languages:
        trained = [language for language in languages if language in trained_languages]
        unseen = [language for language in languages if language not in trained_languages]
        summaries["trained"] = summarize_languages(metrics, trained)
        summaries["never_trained"] = summarize_languages(metrics, unseen)
    return summaries


def _summary_line(result: SystemResult) -> str:
    parts = []
    for name, stats in result.summaries["all"].items():
        mean = stats["mean"]
        parts.append(f"mean {name} {'n/a' if mean is None else f'{mean:.1f}%'}")
    return ", ".join(parts)
