"""Per-language precision and recall of a refusal judge on human-labelled responses.

The fixture is a JSONL file whose rows carry `response`, `language` and
`human_label` ("refusal" or "compliance"). Rows with a `_meta` key are skipped,
because they are the header that records how the responses were generated. Run as

  python -m mcd_jax.judge tests/fixtures/judge_responses.jsonl

to print the Markdown table that docs/judge.md shows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from mcd_jax.judge.base import RefusalJudge

HUMAN_LABELS = ("refusal", "compliance")


@dataclasses.dataclass(frozen=True)
class LanguageScore:
    """Refusal-detection counts of a judge against human labels, in one language.

    Attributes:
      language: ISO 639-1 code of the queries.
      responses: number of labelled responses.
      human_refusals: responses a person labelled "refusal".
      true_positives: human refusals the judge called refusals.
      false_positives: human compliances the judge called refusals.
      unjudged: responses the judge left unjudged (counted as neither).
    """

    language: str
    responses: int
    human_refusals: int
    true_positives: int
    false_positives: int
    unjudged: int

    @property
    def precision(self) -> float | None:
        """Share of the judge's refusals that a person also labelled refusal; None if none."""
        called = self.true_positives + self.false_positives
        return self.true_positives / called if called else None

    @property
    def recall(self) -> float | None:
        """Share of human refusals the judge called refusals; None if there were none."""
        return self.true_positives / self.human_refusals if self.human_refusals else None


def load_labelled_rows(path: str | Path) -> list[dict]:
    """Read the labelled rows of a judge fixture, skipping its `_meta` header row.

    Raises:
      ValueError: a row lacks a field or has a human label other than "refusal"/"compliance".
    """
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "_meta" in row:
            continue
        missing = {"response", "language", "human_label"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{number} lacks the fields {sorted(missing)}")
        if row["human_label"] not in HUMAN_LABELS:
            raise ValueError(
                f"{path}:{number} has human_label {row['human_label']!r}; "
                f"label every row as one of {HUMAN_LABELS}"
            )
        rows.append(row)
    return rows


def score_by_language(judge: RefusalJudge, rows: Sequence[dict]) -> list[LanguageScore]:
    """Judge every row and count agreements with the human label, per language.

    Args:
      judge: the judge under test.
      rows: labelled rows, as returned by `load_labelled_rows`.

    Returns:
      One `LanguageScore` per language, in order of first appearance.
    """
    verdicts = judge.judge([row["response"] for row in rows], [row["language"] for row in rows])
    counts: dict[str, list[int]] = {}
    for row, verdict in zip(rows, verdicts, strict=True):
        # responses, human refusals, true positives, false positives, unjudged
        tally = counts.setdefault(row["language"], [0, 0, 0, 0, 0])
        human_refused = row["human_label"] == "refusal"
        tally[0] += 1
        tally[1] += human_refused
        tally[2] += bool(verdict.refused) and human_refused
        tally[3] += bool(verdict.refused) and not human_refused
        tally[4] += verdict.refused is None
    return [LanguageScore(language, *tally) for language, tally in counts.items()]


def format_markdown_table(scores: Sequence[LanguageScore]) -> str:
    """Render scores as a Markdown table; "n/a" marks a ratio with a zero denominator."""

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        "| language | responses | human refusals | judge refusals "
        "| precision | recall | unjudged |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for score in scores:
        called = score.true_positives + score.false_positives
        lines.append(
            f"| {score.language} | {score.responses} | {score.human_refusals} | {called} | "
            f"{ratio(score.precision)} | {ratio(score.recall)} | {score.unjudged} |"
        )
    return "\n".join(lines)
