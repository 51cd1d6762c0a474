"""Bad checkpoints and references fail with a message naming the file, tensor or key."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import make_torch_model

from mcd_jax.models import CheckpointError, load_model
from mcd_jax.models.checkpoint_files import GGUFCheckpoint


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_torch_model("llama_untied_gqa").save_pretrained(folder)
    return folder


@pytest.fixture
def model_copy(saved_model, tmp_path):
    return shutil.copytree(saved_model, tmp_path / "model")


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config_json(model_copy):
    (model_copy / "config.json").unlink()

    with pytest.raises(CheckpointError, match=r"config.json is missing"):
        load_model(model_copy)


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()

    with pytest.raises(CheckpointError, match=r"no weights in .*model: expected model.safetensors"):
        load_model(model_copy)


def test_unknown_model_type(model_copy):
    _edit_config(model_copy, model_type="gpt2")

    expected = (
        r"unsupported model_type 'gpt2'; supported model types: "
        r"llama, mistral, qwen2"
    )
    with pytest.raises(ValueError, match=expected):
        load_model(model_copy)


def test_shape_contradicts_config(model_copy):
    _edit_config(model_copy, intermediate_size=80)

    expected = (
        r"tensor 'model.layers.0.mlp.gate_proj.weight' in "
        r".*model.safetensors has shape \(96, 64\), but config.json implies "
        r"\(80, 64\)"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_model(model_copy)


def test_missing_tensor(model_copy):
    _edit_tensors(model_copy, lambda tensors: tensors.pop("model.layers.1.self_attn.v_proj.weight"))

    expected = (
        r"1 tensor\(s\) that config.json implies are missing "
        r"from .*: 'model.layers.1.self_attn.v_proj.weight'"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_model(model_copy)


def test_unexpected_tensor(model_copy):
    def add_bias(tensors):
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    _edit_tensors(model_copy, add_bias)

    expected = (
        r"1 unexpected tensor\(s\) in .*: "
        r"'model.layers.0.self_attn.q_proj.bias'"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_model(model_copy)


def test_truncated_safetensors(model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    expected = (
        r"model.safetensors is not a readable safetensors "
        r"file .*truncated or corrupt"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_model(model_copy)


def test_corrupt_safetensors_header(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json" * 4)

    expected = r"model.safetensors is not a readable safetensors file .*truncated or corrupt"
    with pytest.raises(CheckpointError, match=expected):
        load_model(model_copy)


def test_index_names_missing_shard(tmp_path):
    make_torch_model("llama_untied_gqa").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()

    with pytest.raises(CheckpointError, match=rf"refers to {shard.name}, which is missing"):
        load_model(tmp_path)


def test_non_gguf_file(model_copy):
    with pytest.raises(CheckpointError, match=r"config.json is a file but not a .gguf"):
        load_model(model_copy / "config.json")


def test_reference_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not an existing folder, a .gguf file"):
        load_model(str(tmp_path / "absent" / "folder"))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*absent.gguf does not exist"):
        load_model(tmp_path / "absent.gguf")


def test_unknown_packaged_model():
    expected = (
        r"unknown packaged model 'nope'; packaged models: "
        r"qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct"
    )
    with pytest.raises(FileNotFoundError, match=expected):
        load_model("packaged:nope")


@pytest.mark.parametrize("removed_bytes", [None, 1000], ids=["keep_first_mib", "drop_last_kb"])
def test_truncated_gguf(smollm2_gguf, tmp_path, removed_bytes):
    truncated = tmp_path / "truncated.gguf"
    size = smollm2_gguf.stat().st_size
    kept = (1 << 20) if removed_bytes is None else size - removed_bytes
    with open(smollm2_gguf, "rb") as source:
        truncated.write_bytes(source.read(kept))

    with pytest.raises(CheckpointError, match=r"truncated.gguf is not a readable GGUF file"):
        load_model(truncated)


def test_unsupported_gguf_type(tmp_path):
    import gguf

    path = tmp_path / "int_weights.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.int32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    checkpoint = GGUFCheckpoint(path)

    expected = (
        r"int_weights.gguf \(GGUF tensor 'token_embd.weight'\) "
        r"uses GGML quantisation type I32, which the gguf package cannot dequantize; "
        r"supported types: .*Q4_K"
    )
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.read("model.embed_tokens.weight")
