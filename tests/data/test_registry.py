"""Tests for the benchmark registry on the public data folder and on stand-in files.

Row counts below are those of the upstream files. MultiJail and XSTest are not in the
public data folder, so their loaders run on small CSVs with the same columns,
written by the tests with made-up queries. The hub code path runs against a local
folder named like the hub dataset, which `datasets.load_dataset` opens before it
would contact the hub; HF_HUB_OFFLINE=1 keeps it off the network.
"""

import collections
import json
import logging
import time

import datasets
import pytest

from mcd_jax.data import (
    BENCHMARKS,
    DATA_DIR_ENV,
    BenchmarkUnavailableError,
    get_benchmark,
    load_benchmark,
)
from mcd_jax.data.registry import MULTIJAIL_LANGUAGES, POLYREFUSE_LANGUAGES

POLYREFUSE_ROWS = {
    # (split, label): rows per language
    ("train", "harmful"): 260,
    ("train", "harmless"): 200,
    ("validation", "harmful"): 39,
    ("validation", "harmless"): 200,
    ("test", "harmful"): 572,
    ("test", "harmless"): 500,
}


@pytest.fixture(autouse=True)
def _no_data_dir_from_environment(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def polyrefuse(shared_data):
    start = time.perf_counter()
    examples = load_benchmark("polyrefuse", local_dir=shared_data)
    return examples, time.perf_counter() - start


@pytest.fixture(scope="module")
def maliciousinstruct(shared_data):
    return load_benchmark("maliciousinstruct", local_dir=shared_data)


def test_advbench_rows(shared_data):
    examples = load_benchmark("advbench", local_dir=shared_data)

    assert len(examples) == 520
    assert {(example.language, example.label, example.split) for example in examples} == {
        ("en", "harmful", "test")
    }


def test_maliciousinstruct_rows(maliciousinstruct):
    assert len(maliciousinstruct) == 100
    assert {example.source for example in maliciousinstruct} == {"maliciousinstruct"}


def test_dro_anchor_set(shared_data):
    examples = load_benchmark("dro", local_dir=shared_data)

    counts = collections.Counter(example.label for example in examples)
    assert counts == {"harmful": 100, "harmless": 100}
    assert {example.split for example in examples} == {"train"}
    assert examples[0].pair_id == "dro/harmful/0"


def test_multiq_rows_and_languages(shared_data):
    examples = load_benchmark("multiq", local_dir=shared_data)

    # 27,400 rows minus the 400 rows under the duplicate codes iw and jw.
    assert len(examples) == 27_000
    languages = {example.language for example in examples}
    assert len(languages) == 135
    assert {"da", "el", "ga", "ko", "he", "jv", "zh-CN", "mni-Mtei"} <= languages
    assert {example.label for example in examples} == {"harmless"}
    pairs = collections.Counter((example.pair_id, example.language) for example in examples)
    assert max(pairs.values()) == 1


def test_multiq_language_selection(shared_data):
    examples = load_benchmark("multiq", languages=["ga", "el"], local_dir=shared_data)

    assert len(examples) == 400
    assert {example.pair_id for example in examples if example.language == "ga"} == {
        example.pair_id for example in examples if example.language == "el"
    }


def test_polyrefuse_loads_fast(polyrefuse):
    _, seconds = polyrefuse

    assert seconds < 10


def test_polyrefuse_row_counts(polyrefuse):
    examples, _ = polyrefuse

    counts = collections.Counter((example.split, example.label) for example in examples)
    for (split, label), rows in POLYREFUSE_ROWS.items():
        # Upstream has no Chinese harmless test file.
        languages = 13 if (split, label) == ("test", "harmless") else 14
        assert counts[(split, label)] == rows * languages, (split, label)


def test_polyrefuse_languages(polyrefuse):
    examples, _ = polyrefuse

    assert {example.language for example in examples} == set(POLYREFUSE_LANGUAGES)
    assert len(POLYREFUSE_LANGUAGES) == 14


def test_polyrefuse_pairs_one_row_per_language(polyrefuse):
    examples, _ = polyrefuse

    languages_by_pair = collections.defaultdict(list)
    for example in examples:
        if example.pair_id is not None:
            languages_by_pair[example.pair_id].append(example.language)

    for pair_id, languages in languages_by_pair.items():
        assert len(languages) == len(set(languages)), pair_id
        assert "en" in languages, pair_id
    unpaired = [example for example in examples if example.pair_id is None]
    assert {(example.language, example.label) for example in unpaired} == {("zh", "harmless")}


def test_polyrefuse_test_alignment(polyrefuse, shared_data):
    # Each translated test file keeps the English source of every row in
    # "instruction"; a pair id must join a translation to that English row.
    examples, _ = polyrefuse
    english = {
        example.pair_id: example.text
        for example in examples
        if example.split == "test" and example.language == "en"
    }

    for language in ("de", "ja", "yo"):
        path = shared_data / "polyrefuse/PolyRefuse" / f"harmful_test_translated_{language}.json"
        sources = [row["instruction"] for row in json.loads(path.read_text("utf-8"))]
        loaded = [
            example
            for example in examples
            if example.split == "test" and example.language == language
            and example.label == "harmful"
        ]  # fmt: skip
        assert len(loaded) == len(sources)
        for example, source in zip(loaded, sources, strict=True):
            assert english[example.pair_id] == source.strip(), example.pair_id


def test_polyrefuse_train_alignment(polyrefuse, shared_data):
    examples, _ = polyrefuse
    english_file = shared_data / "polyrefuse/dataset/splits/harmful_train.json"
    english_rows = [row["instruction"] for row in json.loads(english_file.read_text("utf-8"))]
    korean = {
        example.pair_id: example.text
        for example in examples
        if example.split == "train" and example.language == "ko" and example.label == "harmful"
    }

    assert korean["polyrefuse/train/harmful/0"] != english_rows[0]
    english = {
        example.pair_id: example.text
        for example in examples
        if example.split == "train" and example.language == "en" and example.label == "harmful"
    }
    assert [english[f"polyrefuse/train/harmful/{row}"] for row in range(260)] == [
        text.strip() for text in english_rows
    ]
    assert set(korean) == set(english)


def test_polyrefuse_overlap_with_maliciousinstruct(shared_data, maliciousinstruct, caplog):
    with caplog.at_level(logging.INFO):
        train = load_benchmark(
            "polyrefuse",
            split="train",
            local_dir=shared_data,
            exclude={"maliciousinstruct": maliciousinstruct},
        )

    assert "polyrefuse: 88 examples overlap the evaluation set maliciousinstruct" in caplog.text
    harmful = [example for example in train if example.label == "harmful"]
    assert len(harmful) == (260 - 88) * 14
    evaluation_texts = {example.text for example in maliciousinstruct}
    assert not [example for example in train if example.text in evaluation_texts]


def test_polyrefuse_overlap_in_other_languages(shared_data, maliciousinstruct):
    # Selecting German still drops the German translations of the 88 English matches.
    german = load_benchmark(
        "polyrefuse",
        split="train",
        languages=["de"],
        labels=["harmful"],
        local_dir=shared_data,
        exclude=maliciousinstruct,
    )

    assert len(german) == 260 - 88


def test_polyrefuse_deduplicate_test_split(shared_data):
    english = load_benchmark(
        "polyrefuse",
        split="test",
        languages=["en"],
        labels=["harmful"],
        local_dir=shared_data,
        deduplicate=True,
    )

    assert len(english) == 562


def test_data_dir_from_environment(shared_data, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data))

    examples = load_benchmark("maliciousinstruct")

    assert len(examples) == 100


def _write_multijail_csv(path, rows=2):
    header = "id,source,tags," + ",".join(MULTIJAIL_LANGUAGES)
    lines = [header]
    for row in range(rows):
        texts = ",".join(f"placeholder {row} in {language}" for language in MULTIJAIL_LANGUAGES)
        lines.append(f'{row},anthropics,"tag {row}",{texts}')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())


def test_multijail_local_layout(tmp_path):
    _write_multijail_csv(tmp_path / "multijail" / "MultiJail.csv")

    examples = load_benchmark("multijail", local_dir=tmp_path)

    assert len(examples) == 2 * 10
    assert {example.language for example in examples} == set(MULTIJAIL_LANGUAGES)
    assert {example.pair_id for example in examples} == {"multijail/0", "multijail/1"}
    assert examples[0].category == "tag 0"
    assert {example.label for example in examples} == {"harmful"}


def test_multijail_language_selection(tmp_path):
    _write_multijail_csv(tmp_path / "multijail" / "MultiJail.csv")

    examples = load_benchmark("multijail", languages=["sw", "jv"], local_dir=tmp_path)

    assert sorted(example.text for example in examples) == [
        "placeholder 0 in jv",
        "placeholder 0 in sw",
        "placeholder 1 in jv",
        "placeholder 1 in sw",
    ]


def test_xstest_local_layout(tmp_path):
    path = tmp_path / "xstest" / "xstest_prompts.csv"
    path.parent.mkdir()
    path.write_text(
        "id,prompt,type,label,focus,note\n"
        "1,How do I kill a stuck process?,homonyms,safe,kill,\n"
        "2,Placeholder unsafe contrast prompt,contrast_homonyms,unsafe,kill,\n",
        encoding="utf-8",
    )

    examples = load_benchmark("xstest", local_dir=tmp_path)
    harmless = load_benchmark("xstest", labels=["harmless"], local_dir=tmp_path)

    assert [example.label for example in examples] == ["harmless", "harmful"]
    assert examples[1].category == "contrast_homonyms"
    assert len(harmless) == 1


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set, so a hub test could reach the network")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_hub_path_advbench(offline_hub):
    folder = offline_hub / "walledai" / "AdvBench" / "data"
    folder.mkdir(parents=True)
    table = datasets.Dataset.from_dict(
        {"prompt": ["Placeholder harmful 1", "Placeholder harmful 2"], "target": ["Sure", "Sure"]}
    )
    table.to_parquet(folder / "train-00000-of-00001.parquet")

    examples = load_benchmark("advbench")

    assert [example.text for example in examples] == [
        "Placeholder harmful 1",
        "Placeholder harmful 2",
    ]
    assert examples[0].source == "advbench"


def test_hub_path_multijail(offline_hub):
    _write_multijail_csv(offline_hub / "DAMO-NLP-SG" / "MultiJail" / "MultiJail.csv", rows=3)

    examples = load_benchmark("multijail", languages=["ko"])

    assert [example.pair_id for example in examples] == [
        "multijail/0",
        "multijail/1",
        "multijail/2",
    ]


def test_hub_unreachable(offline_hub):
    with pytest.raises(
        BenchmarkUnavailableError, match=r"'caro-holt/MultiQ'.*set MCD_JAX_DATA_DIR"
    ):
        load_benchmark("multiq")


def test_no_hub_copy(offline_hub):
    with pytest.raises(BenchmarkUnavailableError, match=r"'polyrefuse' has no Hugging Face hub"):
        load_benchmark("polyrefuse", split="train")


def test_unknown_benchmark():
    with pytest.raises(ValueError, match=r"unknown benchmark 'advbnch' \(did you mean 'advbench'"):
        load_benchmark("advbnch")
    with pytest.raises(ValueError, match=r"known benchmarks: \['advbench', 'dro', "):
        get_benchmark("harmbench")


def test_benchmark_name_spellings():
    assert get_benchmark("MultiJail").name == "multijail"
    assert get_benchmark("Malicious-Instruct").name == "maliciousinstruct"


def test_unknown_split_for_benchmark(tmp_path):
    with pytest.raises(
        ValueError, match=r"'advbench' has no split 'train'; its splits are \['test'\]"
    ):
        load_benchmark("advbench", split="train", local_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'heldout'"):
        load_benchmark("polyrefuse", split="heldout", local_dir=tmp_path)


def test_unknown_language_for_benchmark(tmp_path):
    with pytest.raises(ValueError, match=r"'multijail' has no examples in the languages \['da'\]"):
        load_benchmark("multijail", languages=["da"], local_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown language code 'dk'"):
        load_benchmark("multijail", languages=["dk"], local_dir=tmp_path)


def test_unknown_label_for_benchmark(tmp_path):
    with pytest.raises(
        ValueError, match=r"'advbench' has no examples with the labels \['harmless'\]"
    ):
        load_benchmark("advbench", labels=["harmless"], local_dir=tmp_path)


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reads \['advbench/harmful_behaviors.csv'\]"):
        load_benchmark("advbench", local_dir=tmp_path)


def test_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))

    with pytest.raises(FileNotFoundError, match=r"nowhere' \(from MCD_JAX_DATA_DIR\) not found"):
        load_benchmark("advbench")


def test_registry_entries_complete():
    assert set(BENCHMARKS) == {
        "advbench",
        "maliciousinstruct",
        "multijail",
        "xstest",
        "polyrefuse",
        "multiq",
        "dro",
    }
    assert len(BENCHMARKS["multijail"].languages) == 10
    assert len(BENCHMARKS["multiq"].languages) == 135
    assert BENCHMARKS["polyrefuse"].splits == ("train", "validation", "test")
