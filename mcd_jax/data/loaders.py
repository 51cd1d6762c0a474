"""Loaders that turn text, CSV, JSON/JSONL and parquet files into lists of `Example`.

Files are read through the `datasets` library, so the same column mapping serves a
local file and a table downloaded from the Hugging Face hub. A `ColumnMap` names the
column that contains each example field; fields without a column get a constant
(`language="en"`, `label="harmful"`). The selection options shared by every loader
run in a fixed order: overlap with evaluation sets is removed first (so translations
of a contaminated query go too), then languages, labels and splits are selected,
then exact duplicates are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
from absl import logging

from mcd_jax.data.languages import canonical_language
from mcd_jax.data.schema import LABELS, Example, canonical_split, examples_from_dataset
from mcd_jax.data.selection import EvaluationSets, apply_selection

PathLike = str | os.PathLike[str]

# File suffix -> `datasets` packaged builder.
FILE_FORMATS: dict[str, str] = {
    ".txt": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """The column names of a table for each example field.

    A field set to None has no column, so the loader takes the constant passed
    for it (`language=`, `label=`, `split=`) or leaves it empty (pair_id,
    category).

    Attributes:
      text: the column with the query, or a mapping from language code to
        column for wide files that keep one column per language (MultiJail).
        Rows of a wide file are parallel: each row becomes one pair.
      language: the column with the language code.
      label: the column with the label; see `label_values` in the loaders for
        sources that spell it differently ("unsafe", "safe").
      pair_id: the column with the id shared by translations of one query.
      split: the column with the split name.
      category: the column with a harm or topic category.
    """

    text: str | Mapping[str, str] = "text"
    language: str | None = None
    label: str | None = None
    pair_id: str | None = None
    split: str | None = None
    category: str | None = None

    def column_names(self) -> list[str]:
        """Return every column this map reads, in field order."""
        text_columns = [self.text] if isinstance(self.text, str) else list(self.text.values())
        optional = [self.language, self.label, self.pair_id, self.split, self.category]
        return text_columns + [column for column in optional if column is not None]


@dataclasses.dataclass(frozen=True)
class FieldValues:
    """Constants and conversions for the fields a `ColumnMap` leaves without a column.

    Attributes:
      source: the `Example.source` of every example.
      language: the language of every example, when the table has no language column.
      label: the label of every example, when the table has no label column.
      split: the split of every example, when the table has no split column.
      label_values: a map from the raw values of the label column to
        "harmful"/"harmless", e.g. {"unsafe": "harmful", "safe": "harmless"}.
      pair_id_prefix: a string put in front of every pair id, so that ids of
        different sources never collide.
      pair_ids_from_rows: give each row the pair id `<prefix><row number>`,
        counted from 0 in the file as read (blank lines of text files included).
    """

    source: str
    language: str | None = None
    label: str | None = None
    split: str | None = None
    label_values: Mapping[str, str] | None = None
    pair_id_prefix: str = ""
    pair_ids_from_rows: bool = False


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide the `datasets` progress bars while reading small files, then restore them."""
    were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()


def infer_file_format(path: PathLike) -> str:
    """Return the `datasets` builder ("text", "csv", "json", "parquet") for a file suffix.

    Raises:
      ValueError: the suffix is not one of `FILE_FORMATS`.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(
            f"cannot infer the format of {os.fspath(path)!r} from its suffix {suffix!r}: "
            f"use one of {sorted(FILE_FORMATS)} or pass file_format= "
            "('text', 'csv', 'json' or 'parquet')"
        )
    return FILE_FORMATS[suffix]


def read_table(
    path: PathLike,
    file_format: str | None = None,
    *,
    column_names: Sequence[str] | None = None,
    drop_blank_lines: bool = True,
) -> datasets.Dataset:
    """Read one file into a `datasets.Dataset` with the packaged `datasets` builders.

    Text files give one row per line in a "text" column. CSV files are read with
    a UTF-8 BOM removed and without turning "NA" or "None" into missing values.
    JSON files may be a JSON array of objects or JSON Lines.

    Args:
      path: the file to read.
      file_format: "text", "csv", "json" or "parquet"; inferred from the suffix
        when None.
      column_names: names for the columns of a CSV file without a header row.
      drop_blank_lines: drop the rows of a text file that are empty after
        stripping whitespace. Parallel loaders keep them to check row alignment.

    Returns:
      The table, with at least one row.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the format is unknown, the file cannot be parsed, or it has no rows.
    """
    path = Path(path)
    file_format = file_format or infer_file_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {os.fspath(path)!r} not found")
    if file_format not in ("text", "csv", "json", "parquet"):
        raise ValueError(
            f"unknown file format {file_format!r} for {os.fspath(path)!r}: "
            "expected 'text', 'csv', 'json' or 'parquet'"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"data file {os.fspath(path)!r} has no rows: it is empty")

    options: dict[str, Any] = {}
    if file_format == "csv":
        options = {"encoding": "utf-8-sig", "na_filter": False}
        if path.suffix.lower() == ".tsv":
            options["sep"] = "\t"
        if column_names is not None:
            options.update(header=None, column_names=list(column_names))

    table = _load_with_datasets(path, file_format, options)
    if file_format == "text" and drop_blank_lines:
        with _quiet_progress_bars():
            table = table.filter(
                lambda text: bool(text.strip()), input_columns="text", keep_in_memory=True
            )
    if table.num_rows == 0:
        raise ValueError(
            f"data file {os.fspath(path)!r} has no rows: it contains only a header, "
            "blank lines or an empty JSON array"
        )
    return table


def _load_with_datasets(path: Path, file_format: str, options: dict[str, Any]) -> datasets.Dataset:
    try:
        with _quiet_progress_bars():
            return datasets.load_dataset(
                file_format, data_files=os.fspath(path), split="train", **options
            )
    except ValueError as error:
        # `datasets` reports a table without data rows as a split with no data.
        if "corresponds to no data" in str(error):
            raise ValueError(f"data file {os.fspath(path)!r} has no rows") from error
        raise ValueError(f"failed to read {os.fspath(path)!r} as {file_format}: {error}") from error
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise ValueError(f"failed to read {os.fspath(path)!r} as {file_format}: {cause}") from error


def _check_columns(table: datasets.Dataset, columns: ColumnMap, where: str) -> None:
    missing = [column for column in columns.column_names() if column not in table.column_names]
    if missing:
        raise ValueError(
            f"{where} has no column {missing[0]!r}; its columns are {table.column_names}. "
            "Set the ColumnMap field to one of them"
        )


def _strip_bom_from_column_names(table: datasets.Dataset) -> datasets.Dataset:
    # A CSV saved by Excel starts with a UTF-8 BOM, which some readers keep in the
    # first header ("\ufeffid"). Column maps name the column without it.
    renames = {name: name.lstrip("\ufeff") for name in table.column_names if name[:1] == "\ufeff"}
    return table.rename_columns(renames) if renames else table


def examples_from_table(
    table: datasets.Dataset,
    columns: ColumnMap,
    values: FieldValues,
    *,
    where: str = "table",
) -> list[Example]:
    """Convert the rows of a table to examples.

    Rows whose text is empty are skipped and counted in the log. For a wide
    table (`columns.text` maps languages to columns) each row gives one example
    per language, all with the same pair id.

    Args:
      table: the rows, e.g. from `read_table` or `datasets.load_dataset`.
      columns: which column contains each field.
      values: constants for fields without a column, and how to build pair ids.
      where: a name for the table in error messages, usually the file path.

    Returns:
      The examples in row order (language order within a row of a wide table).

    Raises:
      ValueError: a column is missing, a field has neither a column nor a
        constant, or a row contains an unknown language, label or split.
    """
    table = _strip_bom_from_column_names(table)
    _check_columns(table, columns, where)
    text_columns = _text_columns_by_language(columns, values, where)

    rows = table.to_dict()
    examples: list[Example] = []
    skipped = 0
    for row in range(table.num_rows):
        fields = _row_fields(rows, row, columns, values, where)
        for language, column in text_columns.items():
            text = rows[column][row]
            text = "" if text is None else str(text).strip()
            if not text:
                skipped += 1
                continue
            if language is not None:
                fields["language"] = language
            examples.append(Example(text=text, **fields))

    if skipped:
        logging.info("%s: skipped %d rows with empty text", where, skipped)
    return examples


def _text_columns_by_language(
    columns: ColumnMap, values: FieldValues, where: str
) -> dict[str | None, str]:
    """Map each language of a wide table to its text column; None keys a narrow table."""
    wide = not isinstance(columns.text, str)
    if wide and columns.language is not None:
        raise ValueError(
            f"{where}: ColumnMap.language={columns.language!r} cannot be combined with "
            "one text column per language; drop one of them"
        )

    required = ["label", "split"] if wide else ["language", "label", "split"]
    for field in required:
        if getattr(columns, field) is None and getattr(values, field) is None:
            raise ValueError(
                f"{where}: no {field} for the examples; pass {field}= "
                f"or name its column with ColumnMap({field}=...)"
            )

    if not wide:
        return {None: columns.text}
    return {canonical_language(language): column for language, column in columns.text.items()}


def _row_fields(
    rows: Mapping[str, list[Any]],
    row: int,
    columns: ColumnMap,
    values: FieldValues,
    where: str,
) -> dict[str, Any]:
    """Collect every field of one row except text, with the row number in errors."""

    def cell(column: str | None, constant: Any) -> Any:
        return constant if column is None else rows[column][row]

    try:
        language = cell(columns.language, values.language)
        if language is not None:
            language = canonical_language(str(language))
        label = _convert_label(cell(columns.label, values.label), values.label_values)
        split = canonical_split(str(cell(columns.split, values.split)))
    except ValueError as error:
        raise ValueError(f"{where}, row {row}: {error}") from error

    pair_id = None
    if columns.pair_id is not None and rows[columns.pair_id][row] not in (None, ""):
        pair_id = f"{values.pair_id_prefix}{rows[columns.pair_id][row]}"
    elif values.pair_ids_from_rows or not isinstance(columns.text, str):
        pair_id = f"{values.pair_id_prefix}{row}"

    category = cell(columns.category, None)
    return {
        "language": language,
        "label": label,
        "pair_id": pair_id,
        "source": values.source,
        "split": split,
        "category": None if category in (None, "") else str(category),
    }


def _convert_label(raw: Any, label_values: Mapping[str, str] | None) -> str:
    label = str(raw).strip()
    if label_values is not None:
        if label not in label_values:
            raise ValueError(
                f"label value {label!r} is not in label_values {dict(label_values)}; "
                "add it to label_values"
            )
        label = label_values[label]
    if label not in LABELS:
        raise ValueError(
            f"invalid label {label!r}: expected one of {list(LABELS)}, "
            "or pass label_values= to convert the values of the label column"
        )
    return label


def load_file(
    path: PathLike,
    columns: ColumnMap | None = None,
    *,
    source: str | None = None,
    language: str | None = None,
    label: str | None = None,
    split: str | None = None,
    label_values: Mapping[str, str] | None = None,
    pair_id_prefix: str = "",
    pair_ids_from_rows: bool = False,
    file_format: str | None = None,
    column_names: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    deduplicate: bool = False,
    exclude: EvaluationSets | None = None,
) -> list[Example]:
    """Load the examples of one text, CSV, JSON/JSONL or parquet file.

    Example, for AdvBench's CSV (harmful instructions in the "goal" column):

        load_file("harmful_behaviors.csv", ColumnMap(text="goal"),
                  language="en", label="harmful", split="test")

    Args:
      path: the file; its suffix selects the format unless `file_format` is given.
      columns: which column contains each field. Defaults to `ColumnMap()`, whose
        text column "text" is also the single column of a text file.
      source: the `Example.source`; defaults to the file name without suffix.
      language, label, split: constants for the fields `columns` has no column for.
      label_values: a map from raw label values to "harmful"/"harmless".
      pair_id_prefix: a string put in front of every pair id.
      pair_ids_from_rows: give each row the pair id `<pair_id_prefix><row>`.
      file_format: "text", "csv", "json" or "parquet".
      column_names: column names of a CSV file without a header row.
      languages, labels, splits: keep only these; None keeps all.
      deduplicate: drop exact repeats within a language (see `deduplicate_examples`).
      exclude: evaluation sets whose queries are dropped (see `exclude_overlap`).

    Returns:
      The selected examples in file order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file has no rows, a column is missing, or a value is invalid.
    """
    path = Path(path)
    columns = columns or ColumnMap()
    values = FieldValues(
        source=source or path.stem,
        language=language,
        label=label,
        split=split,
        label_values=label_values,
        pair_id_prefix=pair_id_prefix,
        pair_ids_from_rows=pair_ids_from_rows,
    )

    table = read_table(
        path,
        file_format,
        column_names=column_names,
        drop_blank_lines=not pair_ids_from_rows,
    )
    examples = examples_from_table(table, columns, values, where=os.fspath(path))
    logging.info("Read %d examples from %s", len(examples), os.fspath(path))
    return apply_selection(
        examples,
        languages=languages,
        labels=labels,
        splits=splits,
        deduplicate=deduplicate,
        exclude=exclude,
        where=os.fspath(path),
    )


def load_parallel(
    paths: Mapping[str, PathLike],
    columns: ColumnMap | Mapping[str, ColumnMap] | None = None,
    *,
    source: str,
    label: str | None = None,
    split: str | None = None,
    label_values: Mapping[str, str] | None = None,
    pair_id_prefix: str | None = None,
    file_format: str | None = None,
    languages: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    deduplicate: bool = False,
    exclude: EvaluationSets | None = None,
) -> list[Example]:
    """Load row-aligned files, one per language, giving row i of every file one pair id.

    The pair id of row i is `<pair_id_prefix><i>`, counted from 0 over the rows
    as read (blank lines of text files included), so translations made line by
    line stay aligned. A row that is blank in some files must be blank in all.

    Args:
      paths: a map from language code to that language's file.
      columns: one `ColumnMap` for every file, or a map from language code to
        the `ColumnMap` of that file. Language columns are ignored: the key of
        `paths` is the language.
      source: the `Example.source`.
      label, split, label_values: as in `load_file`.
      pair_id_prefix: defaults to "<source>/<split>/<label>/" (parts without a
        constant left out).
      file_format, languages, labels, splits, deduplicate, exclude: as in
        `load_file`.

    Returns:
      The selected examples, grouped by file in the order of `paths`.

    Raises:
      ValueError: `paths` is empty, the files have different numbers of rows,
        blank rows differ between files, or any `load_file` error.
    """
    if not paths:
        raise ValueError("load_parallel needs at least one file: paths is empty")
    if pair_id_prefix is None:
        parts = [source, split, label]
        pair_id_prefix = "".join(f"{part}/" for part in parts if part is not None)

    tables, file_names = _read_parallel_tables(paths, file_format)
    _check_parallel_lengths(tables, file_names)

    examples: list[Example] = []
    for language, table in tables.items():
        file_columns = _columns_for_language(columns, language)
        values = FieldValues(
            source=source,
            language=language,
            label=label,
            split=split,
            label_values=label_values,
            pair_id_prefix=pair_id_prefix,
            pair_ids_from_rows=True,
        )
        examples += examples_from_table(table, file_columns, values, where=file_names[language])
    _check_parallel_blank_rows(examples, tables, file_names)

    logging.info(
        "Read %d examples from %d parallel files (%s)",
        len(examples),
        len(tables),
        ", ".join(tables),
    )
    return apply_selection(
        examples,
        languages=languages,
        labels=labels,
        splits=splits,
        deduplicate=deduplicate,
        exclude=exclude,
        where=f"{source} parallel files",
    )


def _read_parallel_tables(
    paths: Mapping[str, PathLike], file_format: str | None
) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """Read each language's file, keeping blank rows so row numbers stay aligned."""
    tables: dict[str, datasets.Dataset] = {}
    file_names: dict[str, str] = {}
    for language, path in paths.items():
        code = canonical_language(language)
        if code in tables:
            raise ValueError(
                f"parallel files {file_names[code]!r} and {os.fspath(path)!r} are both "
                f"language {code!r}; give each language one file"
            )
        table = read_table(path, file_format, drop_blank_lines=False)
        tables[code] = _strip_trailing_blank_rows(table)
        file_names[code] = os.fspath(path)
    return tables, file_names


def _columns_for_language(
    columns: ColumnMap | Mapping[str, ColumnMap] | None, language: str
) -> ColumnMap:
    if isinstance(columns, Mapping):
        by_language = {canonical_language(code): value for code, value in columns.items()}
        if language not in by_language:
            raise ValueError(
                f"columns has no ColumnMap for language {language!r}; it has {sorted(by_language)}"
            )
        columns = by_language[language]
    # The key of `paths` is the language, so a language column is never read.
    return dataclasses.replace(columns or ColumnMap(), language=None)


def _strip_trailing_blank_rows(table: datasets.Dataset) -> datasets.Dataset:
    if "text" not in table.column_names or table.features["text"].dtype != "string":
        return table
    texts = table["text"]
    end = len(texts)
    while end > 0 and not (texts[end - 1] or "").strip():
        end -= 1
    return table.select(range(end)) if end < len(texts) else table


def _check_parallel_lengths(
    tables: Mapping[str, datasets.Dataset], file_names: Mapping[str, str]
) -> None:
    lengths = {language: table.num_rows for language, table in tables.items()}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(
            f"{file_names[language]} ({language}) has {length} rows"
            for language, length in lengths.items()
        )
        raise ValueError(
            f"parallel files have different numbers of rows: {listing}. "
            "The files must be row-aligned translations of each other"
        )


def _check_parallel_blank_rows(
    examples: Sequence[Example],
    tables: Mapping[str, datasets.Dataset],
    file_names: Mapping[str, str],
) -> None:
    pair_ids_by_language: dict[str, set[str | None]] = {language: set() for language in tables}
    for example in examples:
        pair_ids_by_language[example.language].add(example.pair_id)

    reference_language, reference_ids = next(iter(pair_ids_by_language.items()))
    for language, pair_ids in pair_ids_by_language.items():
        differing = sorted(pair_ids ^ reference_ids, key=str)
        if differing:
            raise ValueError(
                f"parallel files are not aligned: the rows with pair ids {differing[:5]} are "
                f"blank in only one of {file_names[reference_language]} and "
                f"{file_names[language]}. Remove or fill those rows in every language"
            )


def load_builtin(
    split: str,
    languages: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    *,
    directory: PathLike | None = None,
) -> list[Example]:
    """Load the project's own parallel safety dataset shipped in `mcd_jax/data/builtin/`.

    Each split is a JSON Lines file `<split>.jsonl` with one example a line and the
    keys text, language, label, pair_id, source, split and category.

    Args:
      split: "train" or "test" (the splits shipped).
      languages: keep only these language codes; None keeps all.
      labels: keep only these labels; None keeps both.
      directory: read `<split>.jsonl` from this folder instead of the package.

    Returns:
      The examples in file order.

    Raises:
      FileNotFoundError: the split has no file; the message lists the splits found.
      ValueError: the split name or a row is invalid.
    """
    split = canonical_split(split)
    with contextlib.ExitStack() as stack:
        if directory is None:
            package_files = resources.files("mcd_jax.data") / "builtin"
            folder = stack.enter_context(resources.as_file(package_files))
        else:
            folder = Path(directory)

        path = Path(folder) / f"{split}.jsonl"
        if not path.is_file():
            found = sorted(file.stem for file in Path(folder).glob("*.jsonl"))
            raise FileNotFoundError(
                f"the built-in dataset has no split {split!r}: {os.fspath(path)!r} not found. "
                f"Splits found in {os.fspath(folder)!r}: {found}"
            )
        table = read_table(path, "json")

    examples = examples_from_dataset(table)
    wrong_split = [example for example in examples if example.split != split]
    if wrong_split:
        raise ValueError(
            f"{os.fspath(path)!r} contains examples of split {wrong_split[0].split!r}; "
            f"every row of {split}.jsonl must have split {split!r}"
        )

    logging.info("Read %d built-in examples of split %s", len(examples), split)
    return apply_selection(examples, languages=languages, labels=labels, where=f"builtin {split}")
