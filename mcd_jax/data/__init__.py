"""Examples, dataset loaders and the registry of public safety benchmarks."""

from mcd_jax.data.languages import (
    DEPRECATED_LANGUAGES,
    LANGUAGES,
    canonical_language,
    language_name,
)
from mcd_jax.data.schema import (
    FIELDS,
    HARMFUL,
    HARMLESS,
    LABELS,
    REQUIRED_FIELDS,
    SPLITS,
    Example,
    Label,
    canonical_split,
    example_from_record,
    examples_from_dataset,
    examples_to_dataset,
)

__all__ = [
    "DEPRECATED_LANGUAGES",
    "FIELDS",
    "HARMFUL",
    "HARMLESS",
    "LABELS",
    "LANGUAGES",
    "REQUIRED_FIELDS",
    "SPLITS",
    "Example",
    "Label",
    "canonical_language",
    "canonical_split",
    "example_from_record",
    "examples_from_dataset",
    "examples_to_dataset",
    "language_name",
]
