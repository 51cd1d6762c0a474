"""The estimation stage end to end: a tiny random model with stub judges, and SmolLM2.

The stub judges decide by the position of a response in the judged batch, which is the
anchor order, so the expected labels are known whatever the random model writes.
"""

import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mcd_jax.data import HARMFUL, load_builtin
from mcd_jax.judge import KeywordRefusalJudge, RefusalJudge, Verdict
from mcd_jax.method.estimation import (
    ESTIMATION_SUBDIR,
    HARMFULNESS_PROBE_FILE,
    LABELS_FILE,
    RECORD_FILE,
    REFUSAL_PROBE_FILE,
    RESPONSES_FILE,
    STATES_FILE,
    SUMMARY_FILE,
    TRANSFORM_FILE,
    DegenerateLabelsError,
    EstimationSettings,
    _longest,
    load_anchors,
    run_estimation,
)
from mcd_jax.method.probes import ProbeTrainingConfig
from mcd_jax.models import load_model
from mcd_jax.training.config import EstimationConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from tiny_models import _SIZES, VARIANTS  # noqa: E402

ANCHORS_PER_LABEL = 6
GREEDY = EstimationConfig(
    label_samples=1, label_keep_longest=1, label_max_new_tokens=4, label_decoding="greedy"
)
FAST_PROBE = ProbeTrainingConfig(num_folds=4, max_steps=200)
SETTINGS = EstimationSettings(
    anchors_per_label=ANCHORS_PER_LABEL, labels=GREEDY, probe=FAST_PROBE, batch_size=8
)
ARTIFACTS = (
    RECORD_FILE,
    TRANSFORM_FILE,
    REFUSAL_PROBE_FILE,
    HARMFULNESS_PROBE_FILE,
    STATES_FILE,
    LABELS_FILE,
    RESPONSES_FILE,
    SUMMARY_FILE,
)


class AnchorLabelJudge(RefusalJudge):
    """Refuses the responses of harmful anchors, judges none of `unjudged_queries`.

    Each call judges one condition's kept responses in anchor order, `samples` per anchor.
    """

    def __init__(self, anchor_labels: Sequence[str], samples: int = 1, unjudged_queries=()):
        self.anchor_labels = list(anchor_labels)
        self.samples = samples
        self.unjudged_queries = set(unjudged_queries)
        self.calls = 0

    @property
    def covered_languages(self) -> frozenset[str]:
        return frozenset({"en"})

    def judge(self, responses, languages) -> list[Verdict]:
        self.calls += 1
        assert len(responses) == len(self.anchor_labels) * self.samples
        verdicts = []
        for position in range(len(responses)):
            query = position // self.samples
            if query in self.unjudged_queries:
                verdicts.append(Verdict(None, "stub: unjudged"))
            else:
                verdicts.append(Verdict(self.anchor_labels[query] == HARMFUL, "stub"))
        return verdicts


class RefuseAllJudge(AnchorLabelJudge):
    def judge(self, responses, languages) -> list[Verdict]:
        self.calls += 1
        return [Verdict(True, "stub: refuse all") for _ in responses]


@pytest.fixture(scope="module")
def tiny_model(smollm2_tokenizer, tmp_path_factory):
    """A random Qwen2 model with SmolLM2's tokenizer and chat template, loaded from a folder."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    config_class, kwargs = VARIANTS["qwen2_qkv_bias"]
    sizes = {**_SIZES, "vocab_size": len(smollm2_tokenizer), "max_position_embeddings": 256}
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(
        config_class(**sizes, **kwargs), dtype=torch.float32
    )
    torch_model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return load_model(folder, dtype=jnp.float32)


@pytest.fixture(scope="module")
def anchor_labels():
    return [example.label for example in _anchors()]


def _anchors():
    examples = load_builtin("train", languages=["en"])
    harmful = [e for e in examples if e.label == HARMFUL][:ANCHORS_PER_LABEL]
    harmless = [e for e in examples if e.label != HARMFUL][:ANCHORS_PER_LABEL]
    return [e for e in examples if e in harmful or e in harmless]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_estimation_writes_artifacts(tiny_model, anchor_labels, tmp_path):
    judge = AnchorLabelJudge(anchor_labels)
    result = run_estimation(tiny_model, SETTINGS, tmp_path, judge=judge)
    directory = tmp_path / ESTIMATION_SUBDIR
    num_anchors = 2 * ANCHORS_PER_LABEL
    d = tiny_model.config.hidden_size

    assert not result.reused
    assert judge.calls == 4
    for name in ARTIFACTS:
        assert (directory / name).is_file(), name
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert result.states.shape == (4, num_anchors, d)
    assert np.all(np.isfinite(result.states))
    assert result.transform.basis.shape == (d, d)
    assert result.refusal_probe.weight.shape == (4,)

    harmful = np.asarray([label == HARMFUL for label in anchor_labels])
    np.testing.assert_array_equal(result.compliance, np.tile(~harmful, (4, 1)).astype(np.float32))

    summary = json.loads((directory / SUMMARY_FILE).read_text())
    for condition in ("none", "default", "short", "paraphrase"):
        stats = summary["labels"][condition]
        assert stats[HARMFUL]["refusal_rate"] == 1.0
        assert stats["harmless"]["refusal_rate"] == 0.0
        assert stats["all"]["mean_compliance"] == 0.5
    assert len(summary["explained_variance_ratio"]) == 4
    assert len(summary["refusal_probe"]["heldout_accuracy"]) == FAST_PROBE.num_folds
    assert len(summary["harmfulness_probe"]["heldout_accuracy"]) == FAST_PROBE.num_folds

    labels = _read_jsonl(directory / LABELS_FILE)
    assert len(labels) == 4 * num_anchors
    assert {row["condition"] for row in labels} == {"none", "default", "short", "paraphrase"}
    responses = _read_jsonl(directory / RESPONSES_FILE)
    assert len(responses) == 4 * num_anchors
    assert all(row["num_tokens"] == 4 or row["stopped"] for row in responses)

    record = json.loads((directory / RECORD_FILE).read_text())
    assert record["model"]["kind"] == "folder"
    assert record["model"]["dtype"] == "float32"
    assert "listing_sha256" in record["model"]
    assert record["data"]["harmful"] == ANCHORS_PER_LABEL


def test_estimation_reuses_matching_artifacts(tiny_model, anchor_labels, tmp_path):
    first = run_estimation(tiny_model, SETTINGS, tmp_path, judge=AnchorLabelJudge(anchor_labels))

    judge = AnchorLabelJudge(anchor_labels)
    second = run_estimation(tiny_model, SETTINGS, tmp_path, judge=judge)

    assert second.reused
    assert judge.calls == 0
    np.testing.assert_array_equal(second.states, first.states)
    np.testing.assert_array_equal(second.compliance, first.compliance)
    np.testing.assert_array_equal(second.transform.basis, first.transform.basis)
    np.testing.assert_array_equal(second.refusal_probe.weight, first.refusal_probe.weight)
    assert second.summary == json.loads(json.dumps(first.summary))


def test_estimation_recomputes_on_changed_setting(tiny_model, anchor_labels, tmp_path):
    run_estimation(tiny_model, SETTINGS, tmp_path, judge=AnchorLabelJudge(anchor_labels))

    changed = dataclasses.replace(SETTINGS, num_components=3)
    judge = AnchorLabelJudge(anchor_labels)
    result = run_estimation(tiny_model, changed, tmp_path, judge=judge)

    assert not result.reused
    assert judge.calls == 4
    assert result.transform.num_components == 3
    record = json.loads((tmp_path / ESTIMATION_SUBDIR / RECORD_FILE).read_text())
    assert record["settings"]["num_components"] == 3


def test_estimation_recomputes_missing_artifact(tiny_model, anchor_labels, tmp_path):
    run_estimation(tiny_model, SETTINGS, tmp_path, judge=AnchorLabelJudge(anchor_labels))
    (tmp_path / ESTIMATION_SUBDIR / TRANSFORM_FILE).unlink()

    judge = AnchorLabelJudge(anchor_labels)
    result = run_estimation(tiny_model, SETTINGS, tmp_path, judge=judge)

    assert not result.reused
    assert judge.calls == 4
    assert (tmp_path / ESTIMATION_SUBDIR / TRANSFORM_FILE).is_file()


def test_unjudged_queries_are_dropped(tiny_model, anchor_labels, tmp_path):
    judge = AnchorLabelJudge(anchor_labels, unjudged_queries={0})
    result = run_estimation(tiny_model, SETTINGS, tmp_path, judge=judge)
    directory = tmp_path / ESTIMATION_SUBDIR

    assert np.all(np.isnan(result.compliance[:, 0]))
    assert not np.any(np.isnan(result.compliance[:, 1:]))
    summary = json.loads((directory / SUMMARY_FILE).read_text())
    stats = summary["labels"]["none"]["all"]
    assert stats["dropped_queries"] == 1
    assert stats["unjudged_responses"] == 1
    assert stats["judged_responses"] == 2 * ANCHORS_PER_LABEL - 1
    labels = _read_jsonl(directory / LABELS_FILE)
    assert labels[0]["compliance"] is None
    assert labels[0]["unjudged"] == 1
    responses = _read_jsonl(directory / RESPONSES_FILE)
    assert responses[0]["refused"] is None
    assert responses[0]["reason"] == "stub: unjudged"


def test_keep_longest_prefers_earlier_ties():
    assert _longest([3, 5, 5, 1], keep=2) == [False, True, True, False]
    assert _longest([4, 4, 4], keep=2) == [True, True, False]
    assert _longest([2, 7], keep=2) == [True, True]


def test_sampled_decoding_uses_reference_filters():
    labels = EstimationConfig(label_samples=25, label_keep_longest=20, label_max_new_tokens=9)
    sampling = EstimationSettings(labels=labels, sampling_seed=7).sampling_config((2, 3))

    assert sampling.temperature == 1.0
    assert sampling.top_p == 0.9
    assert sampling.top_k == 50
    assert sampling.seed == 7
    assert sampling.max_new_tokens == 9
    assert sampling.stop_token_ids == (2, 3)


def test_estimation_rejects_refuse_all(tiny_model, anchor_labels, tmp_path):
    with pytest.raises(DegenerateLabelsError, match="refused all of the anchor queries") as error:
        run_estimation(tiny_model, SETTINGS, tmp_path, judge=RefuseAllJudge(anchor_labels))

    assert "kind=folder" in str(error.value)
    assert not (tmp_path / ESTIMATION_SUBDIR / RECORD_FILE).exists()


def test_anchor_set_needs_both_labels(tiny_model, tmp_path):
    harmful_only = [e for e in _anchors() if e.label == HARMFUL]
    with pytest.raises(ValueError, match="6 harmful and 0 harmless"):
        run_estimation(tiny_model, SETTINGS, tmp_path, anchors=harmful_only)


def test_settings_reject_greedy_with_samples():
    labels = EstimationConfig(label_samples=5, label_keep_longest=5, label_decoding="greedy")
    with pytest.raises(ValueError, match="label_samples=5"):
        EstimationSettings(labels=labels)


@pytest.mark.slow
def test_smollm2_refusing_none_raises(tmp_path):
    loaded = load_model("packaged:smollm2-135m-instruct", dtype=jnp.float32)
    labels = EstimationConfig(
        label_samples=1, label_keep_longest=1, label_max_new_tokens=8, label_decoding="greedy"
    )
    settings = EstimationSettings(
        anchors_per_label=2, labels=labels, probe=FAST_PROBE, batch_size=4
    )

    with pytest.raises(DegenerateLabelsError) as error:
        run_estimation(loaded, settings, tmp_path, judge=KeywordRefusalJudge())

    message = str(error.value)
    assert "refused none of the anchor queries" in message
    assert "name=smollm2-135m-instruct" in message
    assert "sha256=" in message
    assert "2 harmful and 2 harmless" in message
    assert "none: 0 refused of 4 judged responses" in message


def test_anchors_load_from_file(tmp_path):
    path = tmp_path / "anchors.jsonl"
    rows = [
        {"text": text, "language": "en", "label": label, "pair_id": f"p{i}", "split": "train"}
        for i, (text, label) in enumerate(
            [("Query one?", "harmful"), ("Query two?", "harmless"), ("Query three?", "harmful")]
        )
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    anchors = load_anchors(EstimationSettings(dataset=str(path), anchors_per_label=1))

    assert [a.text for a in anchors] == ["Query one?", "Query two?"]
    assert [a.label for a in anchors] == ["harmful", "harmless"]


def test_anchors_unknown_dataset_raises(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_anchors(EstimationSettings(dataset=str(missing)))


@pytest.mark.slow
def test_train_command_reports_degenerate_labels(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[2] / "launch" / "train.py"),
        "--model=packaged:smollm2-135m-instruct",
        "--dtype=float32",
        "--mode=dro",
        "--anchors_per_label=2",
        "--label_decoding=greedy",
        "--label_samples=1",
        "--label_keep_longest=1",
        "--label_max_new_tokens=8",
        f"--workdir={workdir}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Estimation failed" in result.stderr
    assert "refused none of the anchor queries" in result.stderr
    assert "Traceback" not in result.stderr
    assert (workdir / "config.json").exists()
