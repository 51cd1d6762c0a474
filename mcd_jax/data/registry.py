"""Named public safety benchmarks: where each lives, its file layout and its column mapping.

`load_benchmark("polyrefuse", split="train")` reads a benchmark from a local data folder
with one sub-folder per benchmark and the upstream file names (`Benchmark.local_files`,
e.g. advbench/harmful_behaviors.csv), or from the Hugging Face hub with
`datasets.load_dataset`. The local folder is the `local_dir` argument, else the
`MCD_JAX_DATA_DIR` environment variable. The hub is used only when neither is set.

AdvBench, MaliciousInstruct, MultiJail, XSTest and MultiQ are published as one
evaluation set each, so their rows get the split "test".
`dataclasses.replace(example, split="train")` relabels them for training.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
from absl import logging

from mcd_jax.data.languages import canonical_language
from mcd_jax.data.loaders import (
    ColumnMap,
    FieldValues,
    PathLike,
    examples_from_table,
    load_file,
    load_parallel,
    read_table,
)
from mcd_jax.data.schema import HARMFUL, HARMLESS, LABELS, Example, canonical_split
from mcd_jax.data.selection import EvaluationSets, apply_selection

DATA_DIR_ENV = "MCD_JAX_DATA_DIR"
"""Environment variable naming a local folder with one sub-folder per benchmark."""


class BenchmarkUnavailableError(RuntimeError):
    """A benchmark has no local copy and could not be loaded from the Hugging Face hub."""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A public benchmark and how to turn its files into examples.

    Attributes:
      name: the registry key, e.g. "polyrefuse".
      title: the name the benchmark's authors use, e.g. "PolyRefuse".
      repository: the upstream repository of the files the local layout copies.
      hub_id: the Hugging Face hub dataset id, or None when none is confirmed.
      hub_split: the split to request from the hub.
      splits: the splits this benchmark provides, in `SPLITS` spelling.
      labels: the labels its examples carry.
      languages: the canonical language codes of its examples.
      local_files: the files (glob patterns) it reads, relative to the data folder.
      read_local: reads one split from a data folder: (folder, split) -> examples.
      read_hub: converts the hub table of one split: (table, split) -> examples.
    """

    name: str
    title: str
    repository: str
    hub_id: str | None
    hub_split: str | None
    splits: tuple[str, ...]
    labels: tuple[str, ...]
    languages: tuple[str, ...]
    local_files: tuple[str, ...]
    read_local: Callable[[Path, str], list[Example]]
    read_hub: Callable[[datasets.Dataset, str], list[Example]] | None = None


def _single_file_readers(
    local_path: str,
    local_columns: ColumnMap,
    hub_columns: ColumnMap | None,
    values: FieldValues,
    drop_languages: tuple[str, ...] = (),
) -> tuple[Callable[[Path, str], list[Example]], Callable[[datasets.Dataset, str], list[Example]]]:
    """Build the local and hub readers of a benchmark stored as one table.

    `drop_languages` lists raw language values whose rows are removed before
    conversion (MultiQ repeats Hebrew and Javanese under deprecated codes).
    """

    def convert(table: datasets.Dataset, columns: ColumnMap, split: str, where: str):
        if drop_languages:
            raw_languages = table[columns.language]
            table = table.select(
                [
                    row
                    for row, language in enumerate(raw_languages)
                    if language not in drop_languages
                ]
            )
        split_values = dataclasses.replace(values, split=split)
        return examples_from_table(table, columns, split_values, where=where)

    def read_local(folder: Path, split: str) -> list[Example]:
        path = folder / local_path
        return convert(read_table(path), local_columns, split, os.fspath(path))

    def read_hub(table: datasets.Dataset, split: str) -> list[Example]:
        return convert(table, hub_columns or local_columns, split, values.source)

    return read_local, read_hub


def _english(source: str, label: str) -> FieldValues:
    return FieldValues(source=source, language="en", label=label)


_advbench_local, _advbench_hub = _single_file_readers(
    "advbench/harmful_behaviors.csv",
    ColumnMap(text="goal"),
    ColumnMap(text="prompt"),
    _english("advbench", HARMFUL),
)

_maliciousinstruct_local, _maliciousinstruct_hub = _single_file_readers(
    "maliciousinstruct/MaliciousInstruct.txt",
    ColumnMap(text="text"),
    ColumnMap(text="prompt"),
    _english("maliciousinstruct", HARMFUL),
)

MULTIJAIL_LANGUAGES = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")

_multijail_local, _multijail_hub = _single_file_readers(
    "multijail/MultiJail.csv",
    ColumnMap(
        text={language: language for language in MULTIJAIL_LANGUAGES},
        pair_id="id",
        category="tags",
    ),
    None,
    FieldValues(source="multijail", label=HARMFUL, pair_id_prefix="multijail/"),
)

_xstest_local, _xstest_hub = _single_file_readers(
    "xstest/xstest_prompts.csv",
    ColumnMap(text="prompt", label="label", category="type"),
    None,
    FieldValues(
        source="xstest",
        language="en",
        label_values={"safe": HARMLESS, "unsafe": HARMFUL},
    ),
)

# MultiQ's 137 language codes include "iw" and "jw", Google Translate's codes for
# Hebrew and Javanese, next to "he" and "jv" with nearly the same rows (195 and 197
# of 200 identical). Their rows are dropped so each pair id has one row per language.
MULTIQ_DUPLICATE_CODES = ("iw", "jw")
MULTIQ_LANGUAGES = (
    *("af", "ak", "am", "ar", "as", "ay", "az", "be", "bg", "bho", "bm", "bn", "bs", "ca"),
    *("ceb", "ckb", "co", "cs", "cy", "da", "de", "doi", "dv", "ee", "el", "en", "eo", "es"),
    *("et", "eu", "fa", "fi", "fil", "fr", "fy", "ga", "gd", "gl", "gn", "gom", "gu", "ha"),
    *("haw", "he", "hi", "hmn", "hr", "ht", "hu", "hy", "id", "ig", "ilo", "is", "it", "ja"),
    *("jv", "ka", "kk", "km", "kn", "ko", "kri", "ku", "ky", "la", "lb", "lg", "ln", "lo"),
    *("lt", "lus", "lv", "mai", "mg", "mi", "mk", "ml", "mn", "mni-Mtei", "mr", "ms", "mt"),
    *("my", "ne", "nl", "no", "nso", "ny", "om", "or", "pa", "pl", "ps", "pt", "qu", "ro"),
    *("ru", "rw", "sa", "sd", "si", "sk", "sl", "sm", "sn", "so", "sq", "sr", "st", "su"),
    *("sv", "sw", "ta", "te", "tg", "th", "ti", "tk", "tl", "tr", "ts", "tt", "ug", "uk"),
    *("ur", "uz", "vi", "xh", "yi", "yo", "zh", "zh-CN", "zh-TW", "zu"),
)

# NOTE: the columns of the hub copy caro-holt/MultiQ are assumed to be those of the
# GitHub CSV (id, language, prompt, domain). Only its row count (27.4k) was checked.
_multiq_local, _multiq_hub = _single_file_readers(
    "multiq/MultiQ.csv",
    ColumnMap(text="prompt", language="language", pair_id="id", category="domain"),
    None,
    FieldValues(source="multiq", label=HARMLESS, pair_id_prefix="multiq/"),
    drop_languages=MULTIQ_DUPLICATE_CODES,
)

POLYREFUSE_LANGUAGES = (
    *("ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "ru", "th", "yo", "zh"),
)
# The English originals of the translated train and validation files, row-aligned with them.
_POLYREFUSE_ENGLISH_FILES = {
    ("train", HARMFUL): "harmful_train.json",
    ("train", HARMLESS): "harmless_train_200_sampled.json",
    ("validation", HARMFUL): "harmful_val.json",
    ("validation", HARMLESS): "harmless_val_200_sampled.json",
}
_POLYREFUSE_FILE_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _polyrefuse_file(folder: Path, split: str, label: str, language: str) -> Path:
    if split != "test" and language == "en":
        return folder / "dataset" / "splits" / _POLYREFUSE_ENGLISH_FILES[(split, label)]
    file_split = _POLYREFUSE_FILE_SPLITS[split]
    return folder / "PolyRefuse" / f"{label}_{file_split}_translated_{language}.json"


def _read_polyrefuse(data_dir: Path, split: str) -> list[Example]:
    """Read both labels of one PolyRefuse split, with pair ids from the row number.

    Test files keep the English source in "instruction" and the translation in
    "instruction_translated". Train and validation files have only "instruction",
    already translated. Upstream has no harmless test file for Chinese, and its
    Chinese harmless train and validation files are a different Alpaca sample from
    the English ones, so those rows get no pair id.
    """
    folder = data_dir / "polyrefuse"
    examples: list[Example] = []
    for label in LABELS:
        paths: dict[str, Path] = {}
        columns: dict[str, ColumnMap] = {}
        for language in POLYREFUSE_LANGUAGES:
            if label == HARMLESS and language == "zh":
                continue
            translated = split == "test" and language != "en"
            text_column = "instruction_translated" if translated else "instruction"
            paths[language] = _polyrefuse_file(folder, split, label, language)
            columns[language] = ColumnMap(text=text_column, category="category")

        examples += load_parallel(
            paths,
            columns,
            source="polyrefuse",
            label=label,
            split=split,
            pair_id_prefix=f"polyrefuse/{split}/{label}/",
        )
        if label == HARMLESS and split != "test":
            examples += load_file(
                _polyrefuse_file(folder, split, label, "zh"),
                ColumnMap(text="instruction", category="category"),
                source="polyrefuse",
                language="zh",
                label=label,
                split=split,
            )
    return examples


def _read_dro(data_dir: Path, split: str) -> list[Example]:
    """Read DRO's 100 harmful and 100 harmless English anchor queries.

    Pair ids are "dro/<label>/<row>", so translations of the files made line by
    line and loaded with `load_parallel(..., pair_id_prefix="dro/<label>/")`
    pair with the English rows.
    """
    files = {HARMFUL: "dro/data/custom.txt", HARMLESS: "dro/data_harmless/custom.txt"}
    examples: list[Example] = []
    for label, relative_path in files.items():
        examples += load_file(
            data_dir / relative_path,
            source="dro",
            language="en",
            label=label,
            split=split,
            pair_id_prefix=f"dro/{label}/",
            pair_ids_from_rows=True,
        )
    return examples


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark(
            name="advbench",
            title="AdvBench (harmful behaviors)",
            repository="https://github.com/llm-attacks/llm-attacks",
            hub_id="walledai/AdvBench",
            hub_split="train",
            splits=("test",),
            labels=(HARMFUL,),
            languages=("en",),
            local_files=("advbench/harmful_behaviors.csv",),
            read_local=_advbench_local,
            read_hub=_advbench_hub,
        ),
        Benchmark(
            name="maliciousinstruct",
            title="MaliciousInstruct",
            repository="https://github.com/Princeton-SysML/Jailbreak_LLM",
            hub_id="walledai/MaliciousInstruct",
            hub_split="train",
            splits=("test",),
            labels=(HARMFUL,),
            languages=("en",),
            local_files=("maliciousinstruct/MaliciousInstruct.txt",),
            read_local=_maliciousinstruct_local,
            read_hub=_maliciousinstruct_hub,
        ),
        Benchmark(
            name="multijail",
            title="MultiJail",
            repository="https://github.com/DAMO-NLP-SG/multilingual-safety-for-LLMs",
            hub_id="DAMO-NLP-SG/MultiJail",
            hub_split="train",
            splits=("test",),
            labels=(HARMFUL,),
            languages=MULTIJAIL_LANGUAGES,
            local_files=("multijail/MultiJail.csv",),
            read_local=_multijail_local,
            read_hub=_multijail_hub,
        ),
        Benchmark(
            name="xstest",
            title="XSTest v2",
            repository="https://github.com/paul-rottger/exaggerated-safety",
            # NOTE: "train" is the split name `datasets` gives the single CSV of
            # Paul/XSTest; the hub copy was not opened to confirm it.
            hub_id="Paul/XSTest",
            hub_split="train",
            splits=("test",),
            labels=(HARMFUL, HARMLESS),
            languages=("en",),
            local_files=("xstest/xstest_prompts.csv",),
            read_local=_xstest_local,
            read_hub=_xstest_hub,
        ),
        Benchmark(
            name="polyrefuse",
            title="PolyRefuse",
            repository="https://github.com/mainlp/Multilingual-Refusal",
            # NOTE: no Hugging Face hub copy of PolyRefuse was found; it loads
            # only from a local folder.
            hub_id=None,
            hub_split=None,
            splits=("train", "validation", "test"),
            labels=(HARMFUL, HARMLESS),
            languages=POLYREFUSE_LANGUAGES,
            local_files=(
                "polyrefuse/PolyRefuse/*_translated_*.json",
                "polyrefuse/dataset/splits/*.json",
            ),
            read_local=_read_polyrefuse,
        ),
        Benchmark(
            name="multiq",
            title="MultiQ",
            repository="https://github.com/paul-rottger/multiq",
            hub_id="caro-holt/MultiQ",
            hub_split="train",
            splits=("test",),
            labels=(HARMLESS,),
            languages=MULTIQ_LANGUAGES,
            local_files=("multiq/MultiQ.csv",),
            read_local=_multiq_local,
            read_hub=_multiq_hub,
        ),
        Benchmark(
            name="dro",
            title="DRO anchor set (custom harmful and harmless queries)",
            repository="https://github.com/chujiezheng/LLM-Safeguard",
            # NOTE: DRO's anchor files are published only in the GitHub repository
            # (code/data/custom.txt, code/data_harmless/custom.txt).
            hub_id=None,
            hub_split=None,
            splits=("train",),
            labels=(HARMFUL, HARMLESS),
            languages=("en",),
            local_files=("dro/data/custom.txt", "dro/data_harmless/custom.txt"),
            read_local=_read_dro,
        ),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """Return the registry entry for a benchmark name, ignoring case, "-" and "_".

    Raises:
      ValueError: the name is unknown; the message lists the known names.
    """
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in BENCHMARKS:
        close = difflib.get_close_matches(key, BENCHMARKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown benchmark {name!r}{hint}; known benchmarks: {sorted(BENCHMARKS)}"
        )
    return BENCHMARKS[key]


def resolve_data_dir(local_dir: PathLike | None = None) -> Path | None:
    """Return the local data folder: `local_dir`, else `$MCD_JAX_DATA_DIR`, else None.

    Raises:
      FileNotFoundError: the folder given does not exist.
    """
    origin = "local_dir"
    if local_dir is None:
        local_dir = os.environ.get(DATA_DIR_ENV) or None
        origin = DATA_DIR_ENV
    if local_dir is None:
        return None

    folder = Path(local_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data folder {os.fspath(folder)!r} (from {origin}) not found: point it at a "
            "folder with one sub-folder per benchmark, e.g. advbench/harmful_behaviors.csv"
        )
    return folder


def load_benchmark(
    name: str,
    split: str | None = None,
    languages: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    local_dir: PathLike | None = None,
    *,
    deduplicate: bool = False,
    exclude: EvaluationSets | None = None,
) -> list[Example]:
    """Load a registered benchmark from a local data folder or the Hugging Face hub.

    Example, PolyRefuse training data without the queries of two evaluation sets:

        evaluation = {name: load_benchmark(name) for name in ("advbench", "maliciousinstruct")}
        train = load_benchmark("polyrefuse", split="train", exclude=evaluation)

    Args:
      name: a key of `BENCHMARKS` ("advbench", "polyrefuse", ...).
      split: one of the benchmark's splits; None loads them all.
      languages: keep only these language codes; None keeps all.
      labels: keep only these labels; None keeps all.
      local_dir: a folder laid out like the project's public data folder; when
        None, `$MCD_JAX_DATA_DIR` is used, and the hub when that is unset too.
      deduplicate: drop exact repeats within a language (PolyRefuse's harmful
        test split repeats 10 of its 572 queries).
      exclude: evaluation sets whose queries, and their translations, are dropped.

    Returns:
      The selected examples.

    Raises:
      ValueError: the name, split, a language or a label is unknown for this benchmark.
      FileNotFoundError: the local folder or one of the benchmark's files in it is missing.
      BenchmarkUnavailableError: no local folder is set and the hub copy is
        missing or cannot be downloaded.
    """
    benchmark = get_benchmark(name)
    splits = _requested_splits(benchmark, split)
    _check_requested(benchmark, languages, labels)
    data_dir = resolve_data_dir(local_dir)

    start = time.perf_counter()
    examples: list[Example] = []
    for split_name in splits:
        if data_dir is not None:
            examples += _read_local(benchmark, data_dir, split_name)
        else:
            examples += _read_hub(benchmark, split_name)

    selected = apply_selection(
        examples,
        languages=languages,
        labels=labels,
        deduplicate=deduplicate,
        exclude=exclude,
        where=benchmark.name,
    )
    logging.info(
        "Loaded %d examples of %s (splits %s) from %s in %.2f s",
        len(selected),
        benchmark.name,
        ", ".join(splits),
        os.fspath(data_dir) if data_dir is not None else f"hub dataset {benchmark.hub_id}",
        time.perf_counter() - start,
    )
    return selected


def _requested_splits(benchmark: Benchmark, split: str | None) -> list[str]:
    if split is None:
        return list(benchmark.splits)
    canonical = canonical_split(split)
    if canonical not in benchmark.splits:
        raise ValueError(
            f"benchmark {benchmark.name!r} has no split {split!r}; "
            f"its splits are {list(benchmark.splits)}"
        )
    return [canonical]


def _check_requested(
    benchmark: Benchmark, languages: Sequence[str] | None, labels: Sequence[str] | None
) -> None:
    if languages is not None and not isinstance(languages, str):
        unknown = [
            code for code in languages if canonical_language(code) not in benchmark.languages
        ]
        if unknown:
            raise ValueError(
                f"benchmark {benchmark.name!r} has no examples in the languages {unknown}; "
                f"its languages are {list(benchmark.languages)}"
            )
    if labels is not None and not isinstance(labels, str):
        unknown = [label for label in labels if label not in benchmark.labels]
        if unknown:
            raise ValueError(
                f"benchmark {benchmark.name!r} has no examples with the labels {unknown}; "
                f"its labels are {list(benchmark.labels)}"
            )


def _read_local(benchmark: Benchmark, data_dir: Path, split: str) -> list[Example]:
    try:
        return benchmark.read_local(data_dir, split)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}. Benchmark {benchmark.name!r} reads {list(benchmark.local_files)} "
            f"under the data folder {os.fspath(data_dir)!r}; copy them from "
            f"{benchmark.repository} keeping the file names"
        ) from error


def _read_hub(benchmark: Benchmark, split: str) -> list[Example]:
    if benchmark.hub_id is None or benchmark.read_hub is None:
        raise BenchmarkUnavailableError(
            f"benchmark {benchmark.name!r} has no Hugging Face hub copy to load. "
            f"Copy {list(benchmark.local_files)} from {benchmark.repository} into a data "
            f"folder and pass local_dir= or set {DATA_DIR_ENV}"
        )

    logging.info("Loading %s from the hub dataset %s", benchmark.name, benchmark.hub_id)
    try:
        table = datasets.load_dataset(benchmark.hub_id, split=benchmark.hub_split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise BenchmarkUnavailableError(
            f"failed to load benchmark {benchmark.name!r} from the hub dataset "
            f"{benchmark.hub_id!r} (split {benchmark.hub_split!r}): {error}. Without hub "
            f"access, copy {list(benchmark.local_files)} from {benchmark.repository} into a "
            f"data folder and pass local_dir= or set {DATA_DIR_ENV}"
        ) from error
    return benchmark.read_hub(table, split)
