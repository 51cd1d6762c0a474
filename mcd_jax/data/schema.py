"""The example schema every part of mcd-jax reads: one query, its language and its label.

Loaders turn benchmark files of any layout into a list of `Example`, and the
estimation stage, the trainer and the evaluation all take such lists. The same
query in several languages shares a `pair_id`, which is how the trainer finds
the English text-prompt state of a query in another language.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import datasets

from mcd_jax.data.languages import canonical_language

Label = Literal["harmful", "harmless"]

HARMFUL: Final = "harmful"
HARMLESS: Final = "harmless"
LABELS: Final[tuple[str, str]] = (HARMFUL, HARMLESS)

SPLITS: Final[tuple[str, str, str]] = ("train", "validation", "test")
"""Split names an `Example` may carry, as the Hugging Face hub spells them."""

# Other spellings of the split names that dataset files use.
SPLIT_ALIASES: Final[dict[str, str]] = {
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
}

# Column order of `examples_to_dataset`, which is also the field order of `Example`.
FIELDS: Final[tuple[str, ...]] = (
    "text",
    "language",
    "label",
    "pair_id",
    "source",
    "split",
    "category",
)

# Fields a record must have; pair_id and category may be missing.
REQUIRED_FIELDS: Final[tuple[str, ...]] = ("text", "language", "label", "source", "split")

_FEATURES = datasets.Features({name: datasets.Value("string") for name in FIELDS})


@dataclasses.dataclass(frozen=True)
class Example:
    """One query with its language, label and provenance.

    Attributes:
      text: the query as a user would type it, stripped of surrounding whitespace.
      language: the canonical language code (see `mcd_jax.data.languages`).
      label: "harmful" or "harmless".
      pair_id: an id shared by the translations of one query across languages;
        None when the query has no parallel versions.
      source: the dataset the query comes from, e.g. "polyrefuse" or "mcd-jax".
      split: "train", "validation" or "test".
      category: the harm or topic category given by the source, if any.
    """

    text: str
    language: str
    label: Label
    pair_id: str | None
    source: str
    split: str
    category: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"invalid example text {self.text!r}: expected a non-empty string")
        if self.text != self.text.strip():
            raise ValueError(
                f"invalid example text {self.text!r}: strip leading and trailing whitespace first"
            )

        canonical = canonical_language(self.language)
        if canonical != self.language:
            raise ValueError(
                f"language code {self.language!r} is not in canonical form: use {canonical!r} "
                "(mcd_jax.data.canonical_language converts it)"
            )

        if self.label not in LABELS:
            raise ValueError(f"invalid label {self.label!r}: expected one of {list(LABELS)}")
        if self.split not in SPLITS:
            raise ValueError(
                f"invalid split {self.split!r}: expected one of {list(SPLITS)} "
                "(mcd_jax.data.canonical_split converts 'val' and 'dev')"
            )
        if self.pair_id is not None and (not isinstance(self.pair_id, str) or not self.pair_id):
            raise ValueError(
                f"invalid pair_id {self.pair_id!r}: expected a non-empty string or None"
            )
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"invalid source {self.source!r}: expected a non-empty string")


def canonical_split(split: str) -> str:
    """Map a split name to one of `SPLITS`, accepting "val", "valid" and "dev".

    Raises:
      ValueError: the name is not one of `SPLITS` or their aliases.
    """
    name = split.strip().lower() if isinstance(split, str) else split
    name = SPLIT_ALIASES.get(name, name)
    if name not in SPLITS:
        raise ValueError(
            f"unknown split {split!r}: expected one of {list(SPLITS)} "
            f"or an alias {sorted(SPLIT_ALIASES)}"
        )
    return name


def example_from_record(record: Mapping[str, Any]) -> Example:
    """Build an `Example` from a mapping with the `FIELDS` keys.

    `pair_id` and `category` may be missing or None. A numeric `pair_id` is
    converted to a string. Keys outside `FIELDS` are ignored.

    Raises:
      ValueError: a required key is missing or a value is invalid.
    """
    missing = [key for key in REQUIRED_FIELDS if key not in record]
    if missing:
        raise ValueError(
            f"record is missing the keys {missing}: it has {sorted(record)}, "
            f"and an example needs {list(REQUIRED_FIELDS)}"
        )

    pair_id = record.get("pair_id")
    return Example(
        text=record["text"],
        language=record["language"],
        label=record["label"],
        pair_id=None if pair_id is None else str(pair_id),
        source=record["source"],
        split=record["split"],
        category=record.get("category"),
    )


def examples_to_dataset(examples: Sequence[Example]) -> datasets.Dataset:
    """Convert examples to a `datasets.Dataset` with one string column per field.

    An empty list gives an empty dataset with the same columns.
    """
    columns = {name: [getattr(example, name) for example in examples] for name in FIELDS}
    return datasets.Dataset.from_dict(columns, features=_FEATURES)


def examples_from_dataset(dataset: datasets.Dataset | Iterable[Mapping[str, Any]]) -> list[Example]:
    """Convert a `datasets.Dataset` (or any iterable of records) back to examples.

    Raises:
      ValueError: a column of `REQUIRED_FIELDS` is missing, or a row contains
        an invalid value.
    """
    if isinstance(dataset, datasets.Dataset):
        missing = [name for name in REQUIRED_FIELDS if name not in dataset.column_names]
        if missing:
            raise ValueError(
                f"dataset is missing the columns {missing}: it has {dataset.column_names}"
            )
    return [example_from_record(record) for record in dataset]
