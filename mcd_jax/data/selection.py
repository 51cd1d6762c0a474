"""Selection, deduplication and evaluation-overlap removal on lists of examples.

Public safety sets reuse each other's queries: PolyRefuse's harmful training split
contains 88 of MaliciousInstruct's 100 queries and 117 of AdvBench's 520. A soft prompt
trained on such data and scored on those benchmarks is scored on its own training
data, so loaders can drop every training query that occurs in given evaluation sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from absl import logging

from mcd_jax.data.languages import canonical_language
from mcd_jax.data.schema import LABELS, Example, canonical_split

# One collection of examples or texts, or a mapping from a display name (used in
# the log) to such a collection.
EvaluationSets = Iterable[Example | str] | Mapping[str, Iterable[Example | str]]


def normalize_text(text: str) -> str:
    """Return the text with runs of whitespace collapsed to one space and the ends stripped.

    This is the key for exact duplicates and for overlap with evaluation sets, so
    "How to  do X?\\n" and "How to do X?" match but "how to do x?" does not.
    """
    return " ".join(text.split())


def filter_examples(
    examples: Iterable[Example],
    *,
    languages: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
) -> list[Example]:
    """Keep the examples whose language, label and split are among the requested ones.

    None selects everything for that field. Language codes and split names are
    converted to their canonical form first ("iw" -> "he", "val" -> "validation").

    Raises:
      ValueError: a requested language code, label or split name is unknown.
    """
    requested_languages = None if languages is None else _canonical_languages(languages)
    requested_labels = None if labels is None else _checked_labels(labels)
    requested_splits = None if splits is None else {canonical_split(split) for split in splits}

    return [
        example
        for example in examples
        if (requested_languages is None or example.language in requested_languages)
        and (requested_labels is None or example.label in requested_labels)
        and (requested_splits is None or example.split in requested_splits)
    ]


def _canonical_languages(languages: Sequence[str]) -> set[str]:
    if isinstance(languages, str):
        raise ValueError(
            f"languages={languages!r} is a string: pass a list such as [{languages!r}]"
        )
    return {canonical_language(language) for language in languages}


def _checked_labels(labels: Sequence[str]) -> set[str]:
    if isinstance(labels, str):
        raise ValueError(f"labels={labels!r} is a string: pass a list such as [{labels!r}]")
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise ValueError(f"unknown labels {unknown}: expected a subset of {list(LABELS)}")
    return set(labels)


def deduplicate_examples(examples: Iterable[Example], *, where: str = "examples") -> list[Example]:
    """Drop exact repeats of a query within one language, keeping the first.

    Two examples are repeats when their languages are equal and their texts are
    equal after `normalize_text`. The number dropped is logged.
    """
    examples = list(examples)
    seen: set[tuple[str, str]] = set()
    unique: list[Example] = []
    for example in examples:
        key = (example.language, normalize_text(example.text))
        if key not in seen:
            seen.add(key)
            unique.append(example)

    logging.info(
        "%s: dropped %d exact duplicates, kept %d examples",
        where,
        len(examples) - len(unique),
        len(unique),
    )
    return unique


def find_overlap(
    examples: Iterable[Example], evaluation_set: Iterable[Example | str]
) -> list[Example]:
    """Return the examples whose text also occurs in an evaluation set.

    Texts are compared after `normalize_text`, in any language: a German
    training query matches only a German evaluation query.
    """
    evaluation_texts = {
        normalize_text(item.text if isinstance(item, Example) else item) for item in evaluation_set
    }
    return [example for example in examples if normalize_text(example.text) in evaluation_texts]


def exclude_overlap(
    examples: Sequence[Example],
    evaluation_sets: EvaluationSets,
    *,
    drop_translations: bool = True,
    where: str = "examples",
) -> list[Example]:
    """Drop the examples that occur in evaluation sets, logging the overlap per set.

    Args:
      examples: the examples to clean, usually training data.
      evaluation_sets: the evaluation examples or texts, or a mapping from a
        name to each set.
      drop_translations: also drop every example that shares a pair id with an
        overlapping one, so a query leaks neither in English nor in translation.
      where: a name for `examples` in the log.

    Returns:
      The examples that remain, in their original order.
    """
    named_sets = _named_evaluation_sets(evaluation_sets)
    overlapping: set[int] = set()
    for name, evaluation_set in named_sets.items():
        matches = find_overlap(examples, evaluation_set)
        logging.info("%s: %d examples overlap the evaluation set %s", where, len(matches), name)
        overlapping.update(id(example) for example in matches)

    dropped_pairs = {
        example.pair_id
        for example in examples
        if id(example) in overlapping and example.pair_id is not None
    }
    kept = [
        example
        for example in examples
        if id(example) not in overlapping
        and not (drop_translations and example.pair_id in dropped_pairs)
    ]
    logging.info(
        "%s: dropped %d examples overlapping evaluation sets (%d pair ids, translations %s), "
        "kept %d",
        where,
        len(examples) - len(kept),
        len(dropped_pairs),
        "included" if drop_translations else "kept",
        len(kept),
    )
    return kept


def _named_evaluation_sets(
    evaluation_sets: EvaluationSets,
) -> dict[str, list[Example | str]]:
    if isinstance(evaluation_sets, Mapping):
        return {str(name): list(items) for name, items in evaluation_sets.items()}
    if isinstance(evaluation_sets, str):
        raise ValueError(
            "evaluation sets must be a collection of examples or texts, not one string: "
            f"pass [{evaluation_sets[:40]!r}]"
        )
    return {"evaluation set": list(evaluation_sets)}


def apply_selection(
    examples: Sequence[Example],
    *,
    languages: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    deduplicate: bool = False,
    exclude: EvaluationSets | None = None,
    where: str = "examples",
) -> list[Example]:
    """Run the selection options every loader shares, in a fixed order.

    Overlap removal runs on the whole load, so that the translations of an
    overlapping query are found even when only other languages are selected.
    Selection by language, label and split comes next, then deduplication.
    """
    selected = list(examples)
    if exclude is not None:
        selected = exclude_overlap(selected, exclude, where=where)
    selected = filter_examples(selected, languages=languages, labels=labels, splits=splits)
    if deduplicate:
        selected = deduplicate_examples(selected, where=where)
    return selected
