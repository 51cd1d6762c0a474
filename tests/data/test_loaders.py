"""Tests for the file loaders, selection options and the built-in dataset reader.

Every file here is written to tmp_path by the test itself, with made-up queries.
"""

import json
import logging

import datasets
import pytest

from mcd_jax.data import (
    ColumnMap,
    Example,
    deduplicate_examples,
    exclude_overlap,
    filter_examples,
    load_builtin,
    load_file,
    load_parallel,
    read_table,
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _example(text, language="en", label="harmless", pair_id=None, split="train"):
    return Example(
        text=text, language=language, label=label, pair_id=pair_id, source="unit", split=split
    )


def test_text_file_one_query_per_line(tmp_path):
    path = _write(tmp_path / "queries.txt", "First question?\n\n  Second question?  \n")

    examples = load_file(path, language="en", label="harmless", split="train")

    assert [example.text for example in examples] == ["First question?", "Second question?"]
    assert examples[0].source == "queries"
    assert examples[0].pair_id is None
    assert examples[0].split == "train"


def test_csv_column_mapping(tmp_path):
    path = _write(
        tmp_path / "table.csv",
        "query,lang,kind,group,topic\n"
        'How do tides work?,en,harmless,q1,science\n"Wie funktionieren Gezeiten?",DE,harmless,q1,\n'
        "Placeholder unsafe request,en,harmful,q2,weapons\n",
    )
    columns = ColumnMap(
        text="query", language="lang", label="kind", pair_id="group", category="topic"
    )

    examples = load_file(path, columns, split="validation", source="mine", pair_id_prefix="m/")

    assert len(examples) == 3
    assert examples[1].language == "de"
    assert examples[1].pair_id == "m/q1"
    assert examples[1].category is None
    assert examples[2].label == "harmful"
    assert examples[2].category == "weapons"
    assert {example.split for example in examples} == {"validation"}
    assert {example.source for example in examples} == {"mine"}


def test_csv_keeps_na_strings_as_text(tmp_path):
    path = _write(tmp_path / "na.csv", "text\nNA\nNone\n")

    examples = load_file(path, language="en", label="harmless", split="test")

    assert [example.text for example in examples] == ["NA", "None"]


def test_csv_without_header(tmp_path):
    path = _write(tmp_path / "plain.csv", "Question one?\nQuestion two?\n")

    examples = load_file(
        path, ColumnMap(text="prompt"), column_names=["prompt"], language="fr",
        label="harmless", split="test",
    )  # fmt: skip

    assert [example.text for example in examples] == ["Question one?", "Question two?"]
    assert examples[0].language == "fr"


def test_tsv_file(tmp_path):
    path = _write(tmp_path / "table.tsv", "text\tlabel\nA, with a comma\tharmless\n")

    examples = load_file(path, ColumnMap(label="label"), language="en", split="train")

    assert examples[0].text == "A, with a comma"


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffid,text\n7,Hello?\n".encode())

    examples = load_file(
        path, ColumnMap(pair_id="id"), language="en", label="harmless", split="train"
    )

    assert examples[0].pair_id == "7"


def test_json_array_and_jsonl(tmp_path):
    rows = [
        {"instruction": "Name a river.", "language": "en", "label": "harmless"},
        {"instruction": "Nenne einen Fluss.", "language": "de", "label": "harmless"},
    ]
    array_path = _write(tmp_path / "rows.json", json.dumps(rows))
    lines_path = _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(row) for row in rows))
    columns = ColumnMap(text="instruction", language="language", label="label")

    from_array = load_file(array_path, columns, split="train", source="rows")
    from_lines = load_file(lines_path, columns, split="train", source="rows")

    assert from_array == from_lines
    assert [example.language for example in from_array] == ["en", "de"]


def test_parquet_file(tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"prompt": ["Q1?", "Q2?"], "split": ["train", "val"]}).to_parquet(
        path
    )

    examples = load_file(
        path, ColumnMap(text="prompt", split="split"), language="en", label="harmless"
    )

    assert [example.split for example in examples] == ["train", "validation"]


def test_label_values_mapping(tmp_path):
    path = _write(tmp_path / "labels.csv", "prompt,label\nA?,safe\nB?,unsafe\n")
    columns = ColumnMap(text="prompt", label="label")
    label_values = {"safe": "harmless", "unsafe": "harmful"}

    examples = load_file(path, columns, language="en", split="test", label_values=label_values)

    assert [example.label for example in examples] == ["harmless", "harmful"]


def test_label_value_not_in_mapping(tmp_path):
    path = _write(tmp_path / "labels.csv", "prompt,label\nA?,safe\nB?,maybe\n")

    with pytest.raises(ValueError, match=r"row 1: label value 'maybe' is not in label_values"):
        load_file(
            path, ColumnMap(text="prompt", label="label"), language="en", split="test",
            label_values={"safe": "harmless"},
        )  # fmt: skip


def test_wide_file_rows_are_pairs(tmp_path):
    path = _write(tmp_path / "wide.csv", "id,en,it\n1,Hello?,Ciao?\n2,Bye?,\n")
    columns = ColumnMap(text={"en": "en", "it": "it"}, pair_id="id")

    examples = load_file(path, columns, label="harmless", split="test", pair_id_prefix="w/")

    assert [(example.language, example.pair_id) for example in examples] == [
        ("en", "w/1"),
        ("it", "w/1"),
        ("en", "w/2"),
    ]


def test_select_by_language_label_split(tmp_path):
    path = _write(
        tmp_path / "mixed.csv",
        "text,language,label,split\nA?,en,harmless,train\nB?,de,harmless,test\n"
        "C?,de,harmful,train\nD?,ko,harmful,train\n",
    )
    columns = ColumnMap(language="language", label="label", split="split")

    examples = load_file(
        path, columns, languages=["de", "ko"], labels=["harmful"], splits=["train"]
    )

    assert [example.text for example in examples] == ["C?", "D?"]


def test_filter_rejects_unknown_values():
    examples = [_example("A?")]

    with pytest.raises(ValueError, match=r"unknown language code 'xx'"):
        filter_examples(examples, languages=["xx"])
    with pytest.raises(ValueError, match=r"unknown labels \['safe'\]"):
        filter_examples(examples, labels=["safe"])
    with pytest.raises(ValueError, match=r"unknown split 'dev-2'"):
        filter_examples(examples, splits=["dev-2"])
    with pytest.raises(ValueError, match=r"languages='en' is a string"):
        filter_examples(examples, languages="en")


def test_deduplicate_after_whitespace_normalisation(caplog):
    examples = [
        _example("How  are tides\nformed?"),
        _example("How are tides formed?"),
        _example("how are tides formed?"),
        _example("How are tides formed?", language="de"),
    ]

    with caplog.at_level(logging.INFO):
        kept = deduplicate_examples(examples, where="tides")

    assert kept == [examples[0], examples[2], examples[3]]
    assert "tides: dropped 1 exact duplicates, kept 3 examples" in caplog.text


def test_load_file_deduplicate_option(tmp_path):
    path = _write(tmp_path / "dupes.txt", "Same?\nSame? \nOther?\n")

    examples = load_file(path, language="en", label="harmless", split="train", deduplicate=True)

    assert [example.text for example in examples] == ["Same?", "Other?"]


def test_exclude_overlap_drops_translations(caplog):
    training = [
        _example("Leaked query?", pair_id="p0"),
        _example("Geleakte Frage?", language="de", pair_id="p0"),
        _example("Clean query?", pair_id="p1"),
        _example("Saubere Frage?", language="de", pair_id="p1"),
        _example("Leaked  query?", pair_id=None),
    ]
    evaluation = {"bench": [_example("Leaked query?", split="test")], "texts": ["Nothing here"]}

    with caplog.at_level(logging.INFO):
        kept = exclude_overlap(training, evaluation, where="training")

    assert [example.text for example in kept] == ["Clean query?", "Saubere Frage?"]
    assert "training: 2 examples overlap the evaluation set bench" in caplog.text
    assert "training: 0 examples overlap the evaluation set texts" in caplog.text
    assert "dropped 3 examples overlapping evaluation sets (1 pair ids" in caplog.text


def test_exclude_overlap_keeping_translations():
    training = [
        _example("Leaked?", pair_id="p0"),
        _example("Geleakt?", language="de", pair_id="p0"),
    ]

    kept = exclude_overlap(training, ["Leaked?"], drop_translations=False)

    assert [example.text for example in kept] == ["Geleakt?"]


def test_parallel_files_pair_by_row(tmp_path):
    english = _write(tmp_path / "en.txt", "One?\nTwo?\n\nThree?\n")
    danish = _write(tmp_path / "da.txt", "En?\nTo?\n\nTre?\n\n")

    examples = load_parallel(
        {"en": english, "da": danish}, source="anchors", label="harmless", split="train"
    )

    by_pair = {}
    for example in examples:
        by_pair.setdefault(example.pair_id, {})[example.language] = example.text
    assert by_pair == {
        "anchors/train/harmless/0": {"en": "One?", "da": "En?"},
        "anchors/train/harmless/1": {"en": "Two?", "da": "To?"},
        "anchors/train/harmless/3": {"en": "Three?", "da": "Tre?"},
    }


def test_parallel_pair_ids_match_load_file(tmp_path):
    english = _write(tmp_path / "en.txt", "One?\n\nTwo?\n")
    greek = _write(tmp_path / "el.txt", "Ένα;\n\nΔύο;\n")

    single = load_file(
        english, source="s", language="en", label="harmful", split="train",
        pair_id_prefix="s/harmful/", pair_ids_from_rows=True,
    )  # fmt: skip
    parallel = load_parallel(
        {"el": greek}, source="s", label="harmful", split="train", pair_id_prefix="s/harmful/"
    )

    assert [example.pair_id for example in single] == [example.pair_id for example in parallel]


def test_parallel_files_of_different_lengths(tmp_path):
    english = _write(tmp_path / "en.txt", "One?\nTwo?\nThree?\n")
    korean = _write(tmp_path / "ko.txt", "하나?\n둘?\n")

    with pytest.raises(ValueError, match=r"different numbers of rows: .*en.txt \(en\) has 3 rows"):
        load_parallel({"en": english, "ko": korean}, source="s", label="harmless", split="train")


def test_parallel_blank_row_in_one_file(tmp_path):
    english = _write(tmp_path / "en.txt", "One?\nTwo?\nThree?\n")
    irish = _write(tmp_path / "ga.txt", "A haon?\n\nA trí?\n")

    with pytest.raises(ValueError, match=r"not aligned: the rows with pair ids \['s/1'\]"):
        load_parallel(
            {"en": english, "ga": irish}, source="s", label="harmless", pair_id_prefix="s/",
            split="train",
        )  # fmt: skip


def test_parallel_needs_files():
    with pytest.raises(ValueError, match="paths is empty"):
        load_parallel({}, source="s", label="harmless", split="train")


def test_empty_file(tmp_path):
    path = _write(tmp_path / "empty.txt", "")

    with pytest.raises(ValueError, match=r"empty.txt' has no rows"):
        load_file(path, language="en", label="harmless", split="train")


@pytest.mark.parametrize(
    ("name", "content"),
    [("blank.txt", "\n  \n"), ("header.csv", "text,label\n"), ("array.json", "[]")],
)
def test_file_without_rows(tmp_path, name, content):
    path = _write(tmp_path / name, content)

    with pytest.raises(ValueError, match=rf"{name}' has no rows"):
        read_table(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.csv' not found"):
        read_table(tmp_path / "missing.csv")


def test_unknown_suffix(tmp_path):
    path = _write(tmp_path / "data.xlsx", "x")

    with pytest.raises(ValueError, match=r"suffix '.xlsx'.*pass file_format="):
        read_table(path)


def test_malformed_json(tmp_path):
    path = _write(tmp_path / "broken.json", '[{"text": "a"')

    with pytest.raises(ValueError, match=r"failed to read .*broken.json' as json"):
        read_table(path)


def test_missing_column(tmp_path):
    path = _write(tmp_path / "advbench.csv", "goal,target\nA?,B\n")

    with pytest.raises(
        ValueError, match=r"has no column 'prompt'; its columns are \['goal', 'target'\]"
    ):
        load_file(path, ColumnMap(text="prompt"), language="en", label="harmful", split="test")


def test_missing_field_constant(tmp_path):
    path = _write(tmp_path / "q.txt", "A?\n")

    with pytest.raises(ValueError, match=r"no label for the examples; pass label="):
        load_file(path, language="en", split="train")
    with pytest.raises(ValueError, match=r"no split for the examples; pass split="):
        load_file(path, language="en", label="harmless")


def test_unknown_language_in_file(tmp_path):
    path = _write(tmp_path / "langs.csv", "text,language\nA?,en\nB?,gaelic\n")

    with pytest.raises(ValueError, match=r"row 1: unknown language code 'gaelic'"):
        load_file(path, ColumnMap(language="language"), label="harmless", split="train")


def test_unknown_split_in_file(tmp_path):
    path = _write(tmp_path / "splits.csv", "text,split\nA?,train\nB?,holdout\n")

    with pytest.raises(ValueError, match=r"row 1: unknown split 'holdout'"):
        load_file(path, ColumnMap(split="split"), language="en", label="harmless")


def _write_builtin(folder, split, rows):
    folder.mkdir(exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    return _write(folder / f"{split}.jsonl", "\n".join(lines) + "\n")


def _builtin_row(text, language, label, pair, split="train"):
    return {
        "text": text,
        "language": language,
        "label": label,
        "pair_id": f"{split}-{pair:04d}-{label}",
        "source": "mcd-jax",
        "split": split,
        "category": "privacy",
    }


def test_builtin_from_directory(tmp_path):
    folder = tmp_path / "builtin"
    _write_builtin(
        folder,
        "train",
        [
            _builtin_row("Placeholder harmful query", "en", "harmful", 1),
            _builtin_row("Pladsholder skadelig forespørgsel", "da", "harmful", 1),
            _builtin_row("How do I change a bike tyre?", "en", "harmless", 1),
            _builtin_row("Hvordan skifter jeg et cykeldæk?", "da", "harmless", 1),
        ],
    )

    everything = load_builtin("train", directory=folder)
    danish_harmful = load_builtin("train", ["da"], ["harmful"], directory=folder)

    assert len(everything) == 4
    assert everything[0].source == "mcd-jax"
    assert everything[0].category == "privacy"
    assert [example.pair_id for example in danish_harmful] == ["train-0001-harmful"]


def test_builtin_missing_split(tmp_path):
    folder = tmp_path / "builtin"
    _write_builtin(folder, "train", [_builtin_row("A?", "en", "harmless", 1)])

    with pytest.raises(
        FileNotFoundError, match=r"no split 'validation'.*Splits found .*\['train'\]"
    ):
        load_builtin("val", directory=folder)
    with pytest.raises(ValueError, match=r"unknown split 'dev2'"):
        load_builtin("dev2", directory=folder)


def test_builtin_row_of_other_split(tmp_path):
    folder = tmp_path / "builtin"
    _write_builtin(folder, "test", [_builtin_row("A?", "en", "harmless", 1, split="train")])

    with pytest.raises(ValueError, match=r"every row of test.jsonl must have split 'test'"):
        load_builtin("test", directory=folder)


@pytest.mark.parametrize("split", ["train", "test"])
def test_builtin_packaged_files(split):
    from importlib import resources

    folder = resources.files("mcd_jax.data") / "builtin"
    if not (folder / f"{split}.jsonl").is_file():
        pytest.skip(f"mcd_jax/data/builtin/{split}.jsonl is not written yet")

    examples = load_builtin(split)
    english_harmful = load_builtin(split, ["en"], ["harmful"])

    assert examples
    assert {example.source for example in examples} == {"mcd-jax"}
    assert {example.split for example in examples} == {split}
    assert english_harmful
    assert {(example.language, example.label) for example in english_harmful} == {("en", "harmful")}


def test_parallel_same_language_twice(tmp_path):
    hebrew = _write(tmp_path / "he.txt", "A?\n")
    old_code = _write(tmp_path / "iw.txt", "A?\n")

    with pytest.raises(ValueError, match=r"are both language 'he'"):
        load_parallel({"he": hebrew, "iw": old_code}, source="s", label="harmless", split="train")


def test_parallel_columns_per_language(tmp_path):
    english = _write(tmp_path / "en.json", json.dumps([{"source": "Hi?", "target": ""}]))
    polish = _write(tmp_path / "pl.json", json.dumps([{"source": "Hi?", "target": "Cześć?"}]))
    columns = {"en": ColumnMap(text="source"), "pl": ColumnMap(text="target")}

    examples = load_parallel(
        {"en": english, "pl": polish}, columns, source="s", label="harmless", split="test"
    )

    assert [(example.language, example.text) for example in examples] == [
        ("en", "Hi?"),
        ("pl", "Cześć?"),
    ]
    with pytest.raises(ValueError, match=r"columns has no ColumnMap for language 'pl'"):
        load_parallel(
            {"en": english, "pl": polish}, {"en": ColumnMap(text="source")}, source="s",
            label="harmless", split="test",
        )  # fmt: skip


def test_wide_file_with_language_column(tmp_path):
    path = _write(tmp_path / "wide.csv", "lang,en,it\nen,Hello?,Ciao?\n")
    columns = ColumnMap(text={"en": "en", "it": "it"}, language="lang")

    with pytest.raises(ValueError, match=r"language='lang' cannot be combined"):
        load_file(path, columns, label="harmless", split="test")
