"""The evaluation queries: the built-in test split, registered benchmarks or files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from absl import logging

from mcd_jax.data.languages import canonical_language
from mcd_jax.data.loaders import ColumnMap, FieldValues, examples_from_table, read_table
from mcd_jax.data.registry import BENCHMARKS, get_benchmark, load_benchmark
from mcd_jax.data.schema import LABELS, Example, canonical_split
from mcd_jax.data.selection import filter_examples

BUILTIN_DATASET = "builtin"

# Columns a dataset file may have, by `Example` field; text, language and label are required.
_FILE_COLUMNS = ("text", "language", "label", "pair_id", "category")


def load_evaluation_examples(
    datasets: Sequence[str],
    *,
    split: str = "test",
    languages: Sequence[str] | None = None,
    limit_per_language: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[Example]:
    """Load the queries to evaluate on, from one or more datasets.

    Args:
      datasets: each "builtin" (our parallel dataset), a benchmark name from
        `mcd_jax.data.BENCHMARKS`, or a path to a CSV, JSON/JSONL or parquet file
        with the columns text, language and label (pair_id and category optional).
      split: the split of the built-in dataset and of the benchmarks.
      languages: keep only these language codes; None keeps all.
      limit_per_language: keep the first N queries of each (language, label).
      data_dir: the local benchmark folder (see `load_benchmark`).

    Returns:
      The selected examples, in dataset and file order.

    Raises:
      ValueError: an unknown dataset or benchmark name, a split a benchmark lacks,
        a requested language without examples, or a limit below 1.
      FileNotFoundError: a benchmark's local files are missing.
    """
    if isinstance(datasets, str) or not datasets:
        raise ValueError(f"datasets={datasets!r}: pass a non-empty list such as ['builtin']")
    if limit_per_language is not None and limit_per_language < 1:
        raise ValueError(f"limit_per_language must be >= 1 or None, got {limit_per_language}")
    split = canonical_split(split)

    examples: list[Example] = []
    for dataset in datasets:
        examples += _load_dataset(dataset, split, data_dir)

    if languages is not None:
        requested = [canonical_language(code) for code in languages]
        examples = filter_examples(examples, languages=requested)
        missing = [code for code in requested if not any(e.language == code for e in examples)]
        if missing:
            raise ValueError(
                f"the datasets {list(datasets)} (split {split!r}) have no queries in the "
                f"languages {missing}; drop them from the language list"
            )
    if limit_per_language is not None:
        examples = _first_per_language(examples, limit_per_language)
    if not examples:
        raise ValueError(f"the datasets {list(datasets)} (split {split!r}) gave no queries")
    logging.info("Evaluating on %d queries from %s", len(examples), ", ".join(datasets))
    return examples


def _load_dataset(dataset: str, split: str, data_dir: str | os.PathLike | None) -> list[Example]:
    if dataset == BUILTIN_DATASET:
        from mcd_jax.data.loaders import load_builtin

        return load_builtin(split)
    path = Path(dataset).expanduser()
    if path.is_file():
        return _load_file(path, split)

    try:
        benchmark = get_benchmark(dataset)
    except ValueError as error:
        raise ValueError(
            f"unknown dataset {dataset!r}: not {BUILTIN_DATASET!r}, not an existing file, and "
            f"not a registered benchmark ({error}). Known benchmarks: {sorted(BENCHMARKS)}"
        ) from error
    if split not in benchmark.splits:
        raise ValueError(
            f"benchmark {benchmark.name!r} has no split {split!r}; its splits are "
            f"{list(benchmark.splits)}: pass one of them as the evaluation split"
        )
    return load_benchmark(benchmark.name, split=split, local_dir=data_dir)


def _load_file(path: Path, split: str) -> list[Example]:
    table = read_table(path)
    present = {name: name for name in _FILE_COLUMNS if name in table.column_names}
    missing = [name for name in ("text", "language", "label") if name not in present]
    if missing:
        raise ValueError(
            f"dataset file {os.fspath(path)!r} has the columns {table.column_names} but lacks "
            f"{missing}; an evaluation file needs text, language and label ({'/'.join(LABELS)})"
        )
    columns = ColumnMap(**present)
    values = FieldValues(source=path.stem, split=split)
    return examples_from_table(table, columns, values, where=os.fspath(path))


def _first_per_language(examples: Sequence[Example], limit: int) -> list[Example]:
    counts: dict[tuple[str, str], int] = {}
    kept = []
    for example in examples:
        key = (example.language, example.label)
        if counts.get(key, 0) < limit:
            counts[key] = counts.get(key, 0) + 1
            kept.append(example)
    return kept
