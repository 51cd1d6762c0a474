"""Soft prompt export: round trips into transformers and PEFT, work directories, bad input.

The oracle is the transformers PyTorch model: an exported soft prompt run through
`mcd_jax.torch_runtime` (or PEFT's prompt tuning for prefix placement) must give the logits and
greedy tokens of our JAX model with the same soft prompt.
"""

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from mcd_jax import export
from mcd_jax.chat import format_chat_batch, render_ids
from mcd_jax.generation import default_stop_token_ids, generate
from mcd_jax.method.schedule import SchedulePosition
from mcd_jax.models import load_model
from mcd_jax.sampling import SamplingConfig
from mcd_jax.soft_prompt import init_soft_prompt, splice_soft_prompt, text_prompt_token_ids
from mcd_jax.torch_runtime import SoftPromptRunner
from mcd_jax.training.checkpointing import TrainingCheckpoints, TrainState
from mcd_jax.training.config import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EstimationConfig,
    LoggingConfig,
    MeshConfig,
    MethodConfig,
    ModelSource,
    ScheduleConfig,
    TrainConfig,
    write_resolved_config,
)

sys.path.insert(0, str(Path(__file__).parent / "models"))
from tiny_models import make_torch_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXT_PROMPT = "You are a careful assistant. Refuse harmful requests."
QUERIES = [
    "Hi",
    "Tell me a long story about a cat that travelled to the moon and came back with a rock.",
    "What is 2+2?",
]
# The tiny models run in float32 on both sides, with 2 layers of width 64: measured max
# |logit difference| about 2e-6 on this machine, so 1e-4 still catches any misplaced row.
TINY_TOLERANCE = 1e-4
PLACEMENTS = ("system_slot", "prefix")


def _tiny_models(tokenizer, folder: Path):
    """Save a random Llama with the tokenizer's vocabulary (and the tokenizer); load it in JAX."""
    torch_model = make_torch_model(
        "llama_untied_gqa", vocab_size=len(tokenizer), max_position_embeddings=256
    )
    torch_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return torch_model, load_model(folder, dtype=jnp.float32)


def _trained_like_prompt(loaded, placement: str, seed: int = 0) -> np.ndarray:
    """The text prompt's embeddings plus noise of the embeddings' own scale, like a trained one."""
    table = loaded.model.embed_tokens[...]
    ids = text_prompt_token_ids(loaded.tokenizer, TEXT_PROMPT, placement)
    prompt = np.asarray(init_soft_prompt(table, ids))
    noise = np.random.default_rng(seed).standard_normal(prompt.shape).astype(np.float32)
    return prompt + 0.5 * float(np.std(np.asarray(table))) * noise


def _metadata(loaded, placement: str) -> export.ExportMetadata:
    return export.ExportMetadata(
        model=export.ModelDescription.from_loaded(loaded),
        placement=placement,
        text_prompt=TEXT_PROMPT,
        languages=("en", "da"),
        training={"schedule": "collaborative"},
        metrics={"loss/total": 0.25},
    )


def _jax_logits(loaded, soft_prompt, placement, queries) -> tuple[np.ndarray, np.ndarray]:
    batch = format_chat_batch(
        loaded.tokenizer, queries, soft_prompt_length=len(soft_prompt), placement=placement
    )
    embeds = splice_soft_prompt(
        loaded.model.embed(jnp.asarray(batch.input_ids)),
        jnp.asarray(soft_prompt),
        jnp.asarray(batch.slot_positions),
    )
    output = loaded.model(
        inputs_embeds=embeds,
        attention_mask=jnp.asarray(batch.attention_mask),
        position_ids=jnp.asarray(batch.position_ids),
        return_logits=True,
    )
    return np.asarray(output.logits), batch.attention_mask.astype(bool)


def _jax_greedy(loaded, soft_prompt, placement, queries, max_new_tokens):
    stop_ids = default_stop_token_ids(loaded.tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=stop_ids)
    result = generate(
        loaded.model,
        loaded.tokenizer,
        queries,
        sampling=sampling,
        soft_prompt=soft_prompt,
        placement=placement,
    )
    return result.token_ids


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer, tmp_path_factory):
    """(torch model, JAX LoadedModel, model folder) of a tiny random Llama."""
    folder = tmp_path_factory.mktemp("tiny_model")
    torch_model, loaded = _tiny_models(smollm2_tokenizer, folder)
    return torch_model, loaded, folder


@pytest.fixture(scope="module")
def tiny_exports(tiny, tmp_path_factory):
    """An export per placement of a trained-like soft prompt of the tiny model."""
    _, loaded, _ = tiny
    exports = {}
    for placement in PLACEMENTS:
        soft_prompt = _trained_like_prompt(loaded, placement)
        folder = tmp_path_factory.mktemp(f"export_{placement}")
        result = export.export_soft_prompt(soft_prompt, _metadata(loaded, placement), folder)
        exports[placement] = (soft_prompt, result)
    return exports


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_tiny_logits_match_jax(placement, tiny, tiny_exports):
    torch_model, loaded, _ = tiny
    soft_prompt, result = tiny_exports[placement]

    runner = SoftPromptRunner(torch_model, loaded.tokenizer, result.folder)
    logits, mask = runner.logits(QUERIES)
    ours, our_mask = _jax_logits(loaded, soft_prompt, placement, QUERIES)

    np.testing.assert_array_equal(mask.numpy().astype(bool), our_mask)
    difference = np.abs(logits.numpy() - ours)[our_mask]
    assert difference.max() <= TINY_TOLERANCE


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_tiny_greedy_matches_jax(placement, tiny, tiny_exports):
    torch_model, loaded, _ = tiny
    soft_prompt, result = tiny_exports[placement]

    runner = SoftPromptRunner(torch_model, loaded.tokenizer, result.folder)
    theirs = runner.generate(QUERIES, max_new_tokens=8, do_sample=False)
    ours = _jax_greedy(loaded, soft_prompt, placement, QUERIES, max_new_tokens=8)

    assert theirs.token_ids == ours


def test_export_files_and_sidecar(tiny, tiny_exports):
    _, loaded, _ = tiny
    soft_prompt, result = tiny_exports["prefix"]

    assert result.formats == ("safetensors", "npy", "peft")
    assert sorted(result.files) == [
        "peft_adapter/adapter_config.json",
        "peft_adapter/adapter_model.safetensors",
        "soft_prompt.json",
        "soft_prompt.npy",
        "soft_prompt.safetensors",
    ]
    for path in result.files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    np.testing.assert_array_equal(np.load(result.files["soft_prompt.npy"]), soft_prompt)
    sidecar = json.loads(result.files["soft_prompt.json"].read_text())
    shape = [len(soft_prompt), 64]
    assert sidecar["tensor"] == {"name": "soft_prompt", "shape": shape, "dtype": "float32"}
    assert sidecar["architecture"]["model_type"] == "llama"
    assert sidecar["chat_template"]["template"] == loaded.tokenizer.chat_template
    assert sidecar["placement"] == "prefix"
    assert sidecar["text_prompt"] == TEXT_PROMPT
    assert sidecar["languages"] == ["en", "da"]
    assert sidecar["metrics"] == {"loss/total": 0.25}
    assert sidecar["base_model"] == json.loads(json.dumps(loaded.source))

    loaded_back = export.load_export(result.folder)
    np.testing.assert_array_equal(loaded_back.soft_prompt, soft_prompt)
    assert loaded_back.metadata == _metadata(loaded, "prefix")


def test_system_slot_export_has_no_peft(tiny_exports):
    _, result = tiny_exports["system_slot"]

    assert result.formats == ("safetensors", "npy")
    assert not (result.folder / export.PEFT_DIR).exists()


def test_peft_adapter_matches_prefix(tiny, tiny_exports):
    from peft import PeftModel, PromptTuningConfig

    torch_model, loaded, _ = tiny
    soft_prompt, result = tiny_exports["prefix"]
    peft_model = PeftModel.from_pretrained(torch_model, str(result.folder / export.PEFT_DIR))
    config = peft_model.peft_config["default"]

    assert isinstance(config, PromptTuningConfig)
    assert config.num_virtual_tokens == len(soft_prompt)
    assert config.token_dim == 64
    # PEFT numbers positions across left padding, so rows are compared one at a time unpadded.
    for query in QUERIES:
        ids = render_ids(loaded.tokenizer, query, None)
        with torch.no_grad():
            theirs = peft_model(input_ids=torch.tensor([ids])).logits.numpy()
        ours, _ = _jax_logits(loaded, soft_prompt, "prefix", [query])
        assert theirs.shape == ours.shape
        assert np.abs(theirs - ours).max() <= TINY_TOLERANCE


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(JAX LoadedModel, transformers model) of SmolLM2-135M, both float32 from the GGUF file."""
    loaded = load_model("packaged:smollm2-135m-instruct", dtype=jnp.float32)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return loaded, torch_model


# SmolLM2 has 30 layers, and float32 summation order alone moves its logits (up to ~40 in
# magnitude). Measured with this test's prompts on 2 CPU cores: max |difference| 1.3e-4, at most
# 5.6e-6 of each row's largest |logit|. The tolerance is relative to that largest |logit|.
SMOLLM2_RELATIVE_TOLERANCE = 1e-4


@pytest.mark.slow
def test_smollm2_round_trip(smollm2, tmp_path):
    loaded, torch_model = smollm2
    soft_prompt = _trained_like_prompt(loaded, "system_slot")
    queries = [QUERIES[0], QUERIES[2]]
    result = export.export_soft_prompt(soft_prompt, _metadata(loaded, "system_slot"), tmp_path)

    runner = SoftPromptRunner(torch_model, loaded.tokenizer, result.folder)
    logits, _ = runner.logits(queries)
    ours, mask = _jax_logits(loaded, soft_prompt, "system_slot", queries)
    scale = np.abs(ours).max(axis=-1, keepdims=True)
    relative = (np.abs(logits.numpy() - ours) / scale)[mask]
    assert relative.max() <= SMOLLM2_RELATIVE_TOLERANCE

    theirs = runner.generate(queries, max_new_tokens=5, do_sample=False)
    assert theirs.token_ids == _jax_greedy(loaded, soft_prompt, "system_slot", queries, 5)


def _description(**changes) -> export.ModelDescription:
    fields = dict(
        model_type="llama",
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        chat_template="{{ messages }}",
        source={"kind": "folder", "path": "/models/a"},
    )
    fields.update(changes)
    return export.ModelDescription(**fields)


def _small_prompt(value: float = 0.5) -> np.ndarray:
    return np.full((3, 8), value, dtype=np.float32)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 16}, "hidden size: trained for 16, target has 8"),
        ({"model_type": "qwen2"}, "architecture: trained for 'qwen2', target is 'llama'"),
        ({"chat_template": "{{ other }}"}, "chat template SHA-256"),
    ],
)
def test_mismatched_model_rejected(changes, message, tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="system_slot")

    with pytest.raises(export.ModelMismatchError, match=message):
        export.export_soft_prompt(
            _small_prompt(), metadata, tmp_path, trained_for=_description(**changes)
        )
    assert not any(tmp_path.iterdir())


def test_other_source_same_model_accepted(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="system_slot")
    trained_for = _description(source={"kind": "hub", "hub_id": "org/a", "revision": "abc"})

    result = export.export_soft_prompt(_small_prompt(), metadata, tmp_path, trained_for=trained_for)

    assert (result.folder / export.METADATA_FILE).is_file()


def test_runner_rejects_other_template(tiny, tmp_path):
    torch_model, loaded, _ = tiny
    description = export.ModelDescription.from_loaded(loaded)
    other = dataclasses.replace(description, chat_template=description.chat_template + " ")
    metadata = export.ExportMetadata(model=other, placement="system_slot")
    export.export_soft_prompt(np.zeros((2, 64), np.float32), metadata, tmp_path)

    with pytest.raises(export.ModelMismatchError, match="chat template"):
        SoftPromptRunner(torch_model, loaded.tokenizer, tmp_path)


def test_wrong_width_rejected(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="system_slot")

    with pytest.raises(export.ExportError, match="width 9 but the model's hidden size is 8"):
        export.export_soft_prompt(np.zeros((3, 9), np.float32), metadata, tmp_path)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_prompt_rejected(bad_value, tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="system_slot")
    prompt = _small_prompt()
    prompt[1, 4] = bad_value

    with pytest.raises(export.ExportError, match=r"NaN or inf values in rows \[1\]"):
        export.export_soft_prompt(prompt, metadata, tmp_path)
    assert not any(tmp_path.iterdir())


def test_peft_for_system_slot_rejected(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="system_slot")

    with pytest.raises(export.ExportError, match="placement='system_slot'"):
        export.export_soft_prompt(_small_prompt(), metadata, tmp_path, formats=["peft"])


def test_unknown_format_rejected(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="prefix")

    with pytest.raises(export.ExportError, match="unknown export formats"):
        export.export_soft_prompt(_small_prompt(), metadata, tmp_path, formats=["onnx"])


def test_identical_reexport_is_noop(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="prefix")
    first = export.export_soft_prompt(_small_prompt(), metadata, tmp_path)
    modified = first.files[export.METADATA_FILE].stat().st_mtime_ns

    second = export.export_soft_prompt(_small_prompt(), metadata, tmp_path)

    assert not first.unchanged
    assert second.unchanged
    assert second.files[export.METADATA_FILE].stat().st_mtime_ns == modified


def test_different_export_in_folder_rejected(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="prefix")
    export.export_soft_prompt(_small_prompt(0.5), metadata, tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}

    with pytest.raises(export.ExportConflictError, match="already contains a different"):
        export.export_soft_prompt(_small_prompt(0.25), metadata, tmp_path)
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert after == before


def test_fewer_formats_conflict_with_earlier(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="prefix")
    export.export_soft_prompt(_small_prompt(), metadata, tmp_path)

    with pytest.raises(export.ExportConflictError, match="peft_adapter"):
        export.export_soft_prompt(_small_prompt(), metadata, tmp_path, formats=["npy"])


def test_overwrite_replaces_export(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="prefix")
    export.export_soft_prompt(_small_prompt(0.5), metadata, tmp_path)

    export.export_soft_prompt(
        _small_prompt(0.25), metadata, tmp_path, overwrite=True, formats=["npy"]
    )

    loaded = export.load_export(tmp_path)
    np.testing.assert_array_equal(loaded.soft_prompt, _small_prompt(0.25))
    assert not (tmp_path / export.PEFT_DIR / export.PEFT_WEIGHTS_FILE).exists()
    assert not (tmp_path / export.SOFT_PROMPT_FILE).exists()


def test_modified_file_detected_on_load(tmp_path):
    metadata = export.ExportMetadata(model=_description(), placement="system_slot")
    export.export_soft_prompt(_small_prompt(), metadata, tmp_path)
    np.save(tmp_path / export.NUMPY_FILE, _small_prompt(0.75))

    with pytest.raises(export.ExportError, match="was modified after export"):
        export.load_export(tmp_path)


def _train_config(model_ref: str, workdir: Path, placement: str) -> TrainConfig:
    return TrainConfig(
        model=ModelSource(ref=model_ref, dtype="float32"),
        data=DataConfig(train_languages=("en", "da")),
        method=MethodConfig(text_prompt=TEXT_PROMPT, placement=placement),
        schedule=ScheduleConfig(),
        estimation=EstimationConfig(),
        mesh=MeshConfig(),
        distributed=DistributedConfig(),
        checkpoint=CheckpointConfig(workdir=str(workdir)),
        logging=LoggingConfig(),
    )


def _run_export_program(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "export.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )


def test_launch_exports_workdir(tiny, tmp_path):
    _, loaded, folder = tiny
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_resolved_config(_train_config(str(folder), workdir, "prefix"), workdir)
    soft_prompt = _trained_like_prompt(loaded, "prefix")
    np.save(workdir / export.FINAL_SOFT_PROMPT_FILE, soft_prompt)
    summary = {"steps": 500, "final_metrics": {"loss/total": 0.1}, "model_source": loaded.source}
    (workdir / export.FINAL_SUMMARY_FILE).write_text(json.dumps(summary))

    finished = _run_export_program(f"--workdir={workdir}")

    assert finished.returncode == 0, finished.stderr[-2000:]
    exported = export.load_export(workdir / "export")
    np.testing.assert_array_equal(exported.soft_prompt, soft_prompt)
    assert exported.metadata.model == export.ModelDescription.from_loaded(loaded)
    assert exported.metadata.placement == "prefix"
    assert exported.metadata.metrics == {"loss/total": 0.1}
    assert exported.metadata.training["step"] == 500
    assert exported.metadata.training["trained_model_source"] == loaded.source
    assert exported.metadata.training["method"]["placement"] == "prefix"
    assert (workdir / "export" / export.PEFT_DIR / export.PEFT_CONFIG_FILE).is_file()
    assert export.export_workdir(workdir).unchanged
    np.save(workdir / export.FINAL_SOFT_PROMPT_FILE, soft_prompt + 1.0)
    with pytest.raises(export.ExportConflictError, match="--overwrite"):
        export.export_workdir(workdir)


def test_workdir_checkpoint_fallback(tiny, tmp_path):
    _, loaded, folder = tiny
    write_resolved_config(_train_config(str(folder), tmp_path, "system_slot"), tmp_path)
    soft_prompt = jnp.asarray(_trained_like_prompt(loaded, "system_slot"))
    state = TrainState(
        step=40,
        soft_prompt=soft_prompt,
        opt_state=optax.adamw(1e-3).init(soft_prompt),
        rng_key=jax.random.key(0),
        position=SchedulePosition(language="da", epoch=1, batch=3),
    )
    with TrainingCheckpoints(tmp_path, save_every=10, max_to_keep=2, async_save=False) as saver:
        saver.save(state)
    lines = [{"step": 30, "loss/total": 0.5}, {"step": 40, "loss/total": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    result = export.export_workdir(tmp_path)

    exported = export.load_export(result.folder)
    np.testing.assert_array_equal(exported.soft_prompt, np.asarray(soft_prompt))
    assert result.folder == tmp_path / "export"
    assert exported.metadata.training["soft_prompt_origin"] == "checkpoint"
    assert exported.metadata.training["step"] == 40
    assert exported.metadata.metrics == {"step": 40, "loss/total": 0.4}


def test_workdir_model_record_mismatch(tiny, tmp_path):
    _, loaded, folder = tiny
    write_resolved_config(_train_config(str(folder), tmp_path, "system_slot"), tmp_path)
    np.save(tmp_path / export.FINAL_SOFT_PROMPT_FILE, np.zeros((4, 64), np.float32))
    description = export.ModelDescription.from_loaded(loaded)
    trained_for = dataclasses.replace(description, model_type="mistral")
    export.write_model_record(tmp_path, trained_for)

    with pytest.raises(export.ModelMismatchError, match="trained for 'mistral'"):
        export.export_workdir(tmp_path)
    assert not (tmp_path / "export").exists()


def test_workdir_names_match_trainer():
    from mcd_jax.training import job

    assert export.FINAL_SOFT_PROMPT_FILE == job.FINAL_SOFT_PROMPT_FILE
    assert export.FINAL_SUMMARY_FILE == job.FINAL_SUMMARY_FILE


def test_workdir_without_config_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        export.export_workdir(tmp_path)


def test_torch_runtime_imports_no_jax():
    code = (
        "import sys, mcd_jax.torch_runtime, mcd_jax.export; "
        "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )

    assert output.stdout.strip() == "[]"
