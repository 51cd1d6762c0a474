"""Checks on the shipped parallel safety dataset in mcd_jax/data/builtin.

The files are read with json and importlib.resources, the way an installed package loads them.
"""

import collections
import csv
import json
import re
import unicodedata
from importlib import resources
from pathlib import Path

import pytest

from mcd_jax.data.builtin import build

TRAIN_LANGUAGES = ("en", "da", "ko", "el", "ga")
TEST_LANGUAGES = (*TRAIN_LANGUAGES, "de", "zh", "th", "sw")
SPLIT_LANGUAGES = {"train": TRAIN_LANGUAGES, "test": TEST_LANGUAGES}
MIN_PAIRS = {"train": 100, "test": 50}
CATEGORIES = {
    "violence",
    "weapons",
    "cybercrime",
    "fraud",
    "drugs",
    "self-harm",
    "hate",
    "privacy",
    "misinformation",
}
KEYS = {"text", "language", "label", "pair_id", "source", "split", "category"}

# Unicode character-name prefix of each language's script. Languages not listed use Latin.
SCRIPT_PREFIX = {"ko": "HANGUL", "el": "GREEK", "th": "THAI", "zh": "CJK UNIFIED IDEOGRAPH"}

# Common traditional-only Han characters. Simplified Chinese text must contain none of them.
TRADITIONAL_ONLY = set("這們會說對麼時國來為藥錢鎖門網與嗎個裡學買賣殺醫療讓槍彈種發")


def _read_split(split: str) -> list[dict]:
    text = resources.files("mcd_jax.data.builtin").joinpath(f"{split}.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {split: _read_split(split) for split in SPLIT_LANGUAGES}


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_rows_schema(splits, split):
    for row in splits[split]:
        assert set(row) == KEYS, row
        assert row["split"] == split, row
        assert row["source"] == "mcd-jax", row
        assert row["label"] in ("harmful", "harmless"), row
        assert row["category"] in CATEGORIES, row
        assert row["language"] in SPLIT_LANGUAGES[split], row
        assert row["text"], row
        assert row["text"] == row["text"].strip(), row
        assert re.fullmatch(rf"{split}-\d{{4}}-{row['label']}", row["pair_id"]), row


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_pair_ids_parallel_across_languages(splits, split):
    ids_by_language = collections.defaultdict(list)
    for row in splits[split]:
        ids_by_language[row["language"]].append(row["pair_id"])

    assert set(ids_by_language) == set(SPLIT_LANGUAGES[split])
    english_ids = sorted(ids_by_language["en"])
    for language, ids in ids_by_language.items():
        duplicates = [pair_id for pair_id, n in collections.Counter(ids).items() if n > 1]
        assert not duplicates, f"{split}/{language}: repeated pair ids {duplicates}"
        assert sorted(ids) == english_ids, f"{split}/{language}: pair ids differ from en"


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_label_counts_per_language(splits, split):
    counts = collections.Counter((row["language"], row["label"]) for row in splits[split])
    for language in SPLIT_LANGUAGES[split]:
        harmful = counts[(language, "harmful")]
        harmless = counts[(language, "harmless")]
        assert harmful == harmless, f"{split}/{language}: {harmful} harmful, {harmless} harmless"
        assert harmful >= MIN_PAIRS[split], f"{split}/{language}: only {harmful} harmful"


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_category_shared_by_pair(splits, split):
    category_by_pair: dict[str, set[str]] = collections.defaultdict(set)
    for row in splits[split]:
        pair = row["pair_id"].rsplit("-", 1)[0]
        category_by_pair[pair].add(row["category"])

    mixed = {pair: cats for pair, cats in category_by_pair.items() if len(cats) > 1}
    assert not mixed, f"{split}: pairs with more than one category: {mixed}"


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_categories_spread_evenly(splits, split):
    counts = collections.Counter(
        row["category"]
        for row in splits[split]
        if row["language"] == "en" and row["label"] == "harmful"
    )
    assert set(counts) == CATEGORIES, f"{split}: categories present {sorted(counts)}"
    assert max(counts.values()) - min(counts.values()) <= 1, f"{split}: {dict(counts)}"


def test_train_test_disjoint(splits):
    train_ids = {row["pair_id"] for row in splits["train"]}
    test_ids = {row["pair_id"] for row in splits["test"]}
    assert not train_ids & test_ids

    for language in TRAIN_LANGUAGES:
        train_texts = {_normalise(r["text"]) for r in splits["train"] if r["language"] == language}
        test_texts = {_normalise(r["text"]) for r in splits["test"] if r["language"] == language}
        shared = train_texts & test_texts
        assert not shared, f"{language}: texts in both train and test: {sorted(shared)}"


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_no_duplicate_texts(splits, split):
    texts = collections.Counter((row["language"], _normalise(row["text"])) for row in splits[split])
    duplicates = [key for key, n in texts.items() if n > 1]
    assert not duplicates, f"{split}: repeated texts {duplicates}"


def _letter_scripts(text: str) -> collections.Counter:
    scripts = collections.Counter()
    for char in text:
        if not char.isalpha():
            continue
        name = unicodedata.name(char, "UNKNOWN")
        prefix = next((p for p in SCRIPT_PREFIX.values() if name.startswith(p)), None)
        if prefix is None:
            prefix = "LATIN" if name.startswith("LATIN") else name
        scripts[prefix] += 1
    return scripts


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_text_in_expected_script(splits, split):
    for row in splits[split]:
        expected = SCRIPT_PREFIX.get(row["language"], "LATIN")
        scripts = _letter_scripts(row["text"])
        foreign = set(scripts) - {expected, "LATIN"}
        assert not foreign, f"{row['pair_id']}/{row['language']}: letters from {foreign}"
        # Latin letters may appear in another script (acronyms such as USB or 5G, loanwords such
        # as "drone"), but only as a minority of the letters.
        assert scripts[expected] > sum(scripts.values()) / 2, (
            f"{row['pair_id']}/{row['language']}: mostly not {expected}: {row['text']!r}"
        )


def test_chinese_is_simplified(splits):
    for row in splits["test"]:
        if row["language"] != "zh":
            continue
        traditional = TRADITIONAL_ONLY & set(row["text"])
        assert not traditional, f"{row['pair_id']}: traditional characters {traditional}"


@pytest.mark.parametrize("split", SPLIT_LANGUAGES)
def test_shipped_file_matches_source(splits, split):
    assert splits[split] == build.build_split(split), (
        f"{split}.jsonl is stale; run `python -m mcd_jax.data.builtin.build`"
    )


def _public_texts(data: Path) -> set[str]:
    texts: list[str] = []
    with (data / "advbench" / "harmful_behaviors.csv").open(encoding="utf-8") as handle:
        texts += [row["goal"] for row in csv.DictReader(handle)]
    for path in [data / "maliciousinstruct" / "MaliciousInstruct.txt", *data.glob("dro/**/*.txt")]:
        texts += path.read_text(encoding="utf-8").splitlines()
    for path in data.glob("polyrefuse/**/*.json"):
        for item in json.loads(path.read_text(encoding="utf-8")):
            texts += [item.get("instruction", ""), item.get("instruction_translated", "")]
    with (data / "multiq" / "MultiQ.csv").open(encoding="utf-8") as handle:
        texts += [row["prompt"] for row in csv.DictReader(handle)]
    for path in data.glob("xsafety/**/*.csv"):
        with path.open(encoding="utf-8", errors="replace") as handle:
            texts += [row[0] for row in csv.reader(handle) if row]
    return {_normalise(text) for text in texts if text and text.strip()}


def test_no_row_copied_from_public_sets(splits, shared_data):
    public = _public_texts(shared_data)
    assert len(public) > 10_000, f"read only {len(public)} public texts from {shared_data}"

    for split, rows in splits.items():
        copied = [row["pair_id"] for row in rows if _normalise(row["text"]) in public]
        assert not copied, f"{split}: rows equal to a public dataset row: {copied}"
