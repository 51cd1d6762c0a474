"""Tests for the example schema, language codes and the `datasets` conversion."""

import dataclasses

import pytest

from mcd_jax.data import (
    Example,
    canonical_language,
    canonical_split,
    example_from_record,
    examples_from_dataset,
    examples_to_dataset,
    language_name,
)


def _example(**overrides) -> Example:
    fields = dict(
        text="How do I bake bread?",
        language="en",
        label="harmless",
        pair_id="q-1",
        source="unit-test",
        split="train",
    )
    fields.update(overrides)
    return Example(**fields)


def test_example_is_frozen():
    example = _example()
    with pytest.raises(dataclasses.FrozenInstanceError):
        example.text = "changed"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("en", "en"),
        ("EN", "en"),
        ("iw", "he"),
        ("jw", "jv"),
        ("zh-cn", "zh-CN"),
        ("zh_TW", "zh-TW"),
        ("mni-mtei", "mni-Mtei"),
        ("ceb", "ceb"),
        ("es-419", "es-419"),
    ],
)
def test_canonical_language_spellings(code, expected):
    assert canonical_language(code) == expected


def test_unknown_language_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown language code 'english'.*'en' \(English\)"):
        canonical_language("english")
    with pytest.raises(ValueError, match=r"unknown language code 'dq'"):
        canonical_language("dq")


def test_invalid_language_subtag():
    with pytest.raises(ValueError, match=r"'de-toolong'.*use 'de' for the language alone"):
        canonical_language("de-toolong")


def test_language_name_with_region():
    assert language_name("ga") == "Irish"
    assert language_name("zh-TW") == "Chinese (TW)"


def test_example_rejects_unknown_language():
    with pytest.raises(ValueError, match=r"unknown language code 'xx'.*close matches"):
        _example(language="xx")


def test_example_rejects_noncanonical_language():
    with pytest.raises(ValueError, match=r"'iw' is not in canonical form: use 'he'"):
        _example(language="iw")


def test_example_rejects_bad_label():
    with pytest.raises(ValueError, match=r"invalid label 'safe'.*'harmful', 'harmless'"):
        _example(label="safe")


def test_example_rejects_bad_split():
    with pytest.raises(ValueError, match=r"invalid split 'val'.*canonical_split"):
        _example(split="val")


def test_example_rejects_blank_and_unstripped_text():
    with pytest.raises(ValueError, match="expected a non-empty string"):
        _example(text="   ")
    with pytest.raises(ValueError, match="strip leading and trailing whitespace"):
        _example(text=" padded ")


def test_canonical_split_aliases():
    assert canonical_split("val") == "validation"
    assert canonical_split("Dev") == "validation"
    assert canonical_split("test") == "test"
    with pytest.raises(ValueError, match=r"unknown split 'holdout'"):
        canonical_split("holdout")


def test_dataset_round_trip():
    examples = [
        _example(),
        _example(text="Wie backe ich Brot?", language="de", category="cooking"),
        _example(text="Lonely query", pair_id=None, label="harmful", split="test"),
    ]
    dataset = examples_to_dataset(examples)

    assert dataset.num_rows == 3
    assert dataset.column_names == [
        "text",
        "language",
        "label",
        "pair_id",
        "source",
        "split",
        "category",
    ]
    assert examples_from_dataset(dataset) == examples


def test_empty_dataset_round_trip():
    dataset = examples_to_dataset([])
    assert dataset.num_rows == 0
    assert examples_from_dataset(dataset) == []


def test_dataset_missing_column():
    dataset = examples_to_dataset([_example()]).remove_columns(["label"])
    with pytest.raises(ValueError, match=r"missing the columns \['label'\]"):
        examples_from_dataset(dataset)


def test_record_missing_key_and_numeric_pair_id():
    with pytest.raises(ValueError, match=r"missing the keys \['split'\]"):
        example_from_record({"text": "Hi", "language": "en", "label": "harmless", "source": "s"})
    record = {
        "text": "Hi",
        "language": "en",
        "label": "harmless",
        "source": "s",
        "split": "train",
        "pair_id": 7,
    }
    assert example_from_record(record).pair_id == "7"
