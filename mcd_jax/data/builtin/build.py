"""Build the shipped train.jsonl and test.jsonl from the authoring sources in source/.

The queries were written in English first (source/en.txt) and then translated line by line
(source/<language>.txt). Run this module after editing a source file:

    python -m mcd_jax.data.builtin.build            # rewrite both splits
    python -m mcd_jax.data.builtin.build --split test

Source format, one pair per line, fields separated by " | ", "#" lines and blank lines ignored:

    en.txt:          <pair> | <category> | <harmful text> | <harmless text>
    <language>.txt:  <pair> | <harmful text> | <harmless text>

where <pair> is "<split>-<4 digits>". Each pair yields the pair ids "<pair>-harmful" and
"<pair>-harmless", identical in every language.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from absl import logging

BUILTIN_DIR = Path(__file__).resolve().parent
SOURCE_DIR = BUILTIN_DIR / "source"

# MCD's training languages. The test split adds four languages never used for training.
TRAIN_LANGUAGES = ("en", "da", "ko", "el", "ga")
TEST_LANGUAGES = (*TRAIN_LANGUAGES, "de", "zh", "th", "sw")
SPLIT_LANGUAGES = {"train": TRAIN_LANGUAGES, "test": TEST_LANGUAGES}

CATEGORIES = (
    "violence",
    "weapons",
    "cybercrime",
    "fraud",
    "drugs",
    "self-harm",
    "hate",
    "privacy",
    "misinformation",
)
LABELS = ("harmful", "harmless")
SOURCE_NAME = "mcd-jax"
SEPARATOR = " | "
PAIR_PATTERN = re.compile(r"^(train|test)-\d{4}$")


@dataclass(frozen=True)
class SourcePair:
    """One harmful query and its lexically paired harmless query in one language."""

    pair: str
    harmful: str
    harmless: str
    category: str | None  # Set in en.txt only; translations inherit it.


def _parse_line(path: Path, line_number: int, line: str, english: bool) -> SourcePair:
    fields = [field.strip() for field in line.split(SEPARATOR)]
    expected = 4 if english else 3
    if len(fields) != expected or not all(fields):
        raise ValueError(
            f"{path}:{line_number}: expected {expected} non-empty fields separated by "
            f"{SEPARATOR!r}, got {len(fields)}: {line!r}. Fix the line or remove any extra "
            f"{SEPARATOR.strip()!r} from the text."
        )
    if not PAIR_PATTERN.match(fields[0]):
        raise ValueError(
            f"{path}:{line_number}: invalid pair {fields[0]!r}; write it as 'train-0001' or "
            "'test-0001'."
        )
    if english:
        pair, category, harmful, harmless = fields
        if category not in CATEGORIES:
            raise ValueError(
                f"{path}:{line_number}: unknown category {category!r}; use one of {CATEGORIES}."
            )
        return SourcePair(pair, harmful, harmless, category)
    pair, harmful, harmless = fields
    return SourcePair(pair, harmful, harmless, None)


def read_source(language: str) -> dict[str, SourcePair]:
    """Read source/<language>.txt into pairs keyed by pair ("train-0001").

    Args:
        language: ISO 639-1 code of the source file to read.

    Returns:
        The pairs in file order.

    Raises:
        FileNotFoundError: if the source file is missing.
        ValueError: if a line is malformed or a pair appears twice.
    """
    path = SOURCE_DIR / f"{language}.txt"
    pairs: dict[str, SourcePair] = {}
    for line_number, raw_line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        pair = _parse_line(path, line_number, line, english=language == "en")
        if pair.pair in pairs:
            raise ValueError(
                f"{path}:{line_number}: duplicate pair {pair.pair!r}; keep one of its lines."
            )
        pairs[pair.pair] = pair
    return pairs


def build_split(split: str) -> list[dict[str, str]]:
    """Build the rows of one split: every language, every pair, harmful before harmless.

    Args:
        split: "train" or "test".

    Returns:
        Rows with keys text, language, label, pair_id, source, split, category, ordered by
        language (as in SPLIT_LANGUAGES) and then by the pair order of en.txt.

    Raises:
        ValueError: if the split is unknown, or a language's source lacks a pair of the
            English source or has a pair the English source lacks.
    """
    if split not in SPLIT_LANGUAGES:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLIT_LANGUAGES)}.")
    english = {key: pair for key, pair in read_source("en").items() if key.startswith(split)}

    rows: list[dict[str, str]] = []
    for language in SPLIT_LANGUAGES[split]:
        pairs = read_source(language)
        translated = {key: pair for key, pair in pairs.items() if key.startswith(split)}
        missing = sorted(english.keys() - translated.keys())
        extra = sorted(translated.keys() - english.keys())
        if missing or extra:
            raise ValueError(
                f"source/{language}.txt does not match source/en.txt for split {split!r}: "
                f"missing pairs {missing}, extra pairs {extra}. Translate or remove them."
            )
        for key, source in english.items():
            texts = {"harmful": translated[key].harmful, "harmless": translated[key].harmless}
            for label in LABELS:
                rows.append(
                    {
                        "text": texts[label],
                        "language": language,
                        "label": label,
                        "pair_id": f"{key}-{label}",
                        "source": SOURCE_NAME,
                        "split": split,
                        "category": source.category,
                    }
                )
    return rows


def write_split(split: str, directory: Path = BUILTIN_DIR) -> Path:
    """Build one split and write it as <directory>/<split>.jsonl (UTF-8, one object a line).

    Args:
        split: "train" or "test".
        directory: folder to write into; defaults to the package's builtin folder.

    Returns:
        The path written.
    """
    rows = build_split(split)
    path = directory / f"{split}.jsonl"
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    logging.info("Wrote %d rows to %s.", len(rows), path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Rewrite the requested splits from the authoring sources."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--split",
        choices=(*SPLIT_LANGUAGES, "all"),
        default="all",
        help="which split to rewrite (default: all)",
    )
    args = parser.parse_args(argv)
    splits = tuple(SPLIT_LANGUAGES) if args.split == "all" else (args.split,)
    logging.set_verbosity(logging.INFO)
    for split in splits:
        write_split(split)


if __name__ == "__main__":
    main()
