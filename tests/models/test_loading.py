"""load_model on sharded checkpoints, a hub cache folder and a device mesh."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from tiny_models import make_torch_model, padded_batch, torch_reference

from mcd_jax.models import load_model
from mcd_jax.sharding import batch_sharding, make_mesh

TOLERANCE = 1e-4
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _logits_diff(model, torch_model, padding="left") -> float:
    ids, mask, positions = padded_batch(padding)
    _, logits_ref = torch_reference(torch_model, ids, mask, positions)
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_logits=True).logits
    return float(np.abs(np.asarray(logits) - logits_ref)[mask.astype(bool)].max())


def test_sharded_index_checkpoint(tmp_path):
    torch_model = make_torch_model("qwen2_qkv_bias")
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))

    loaded = load_model(tmp_path, dtype=jnp.float32)

    assert len(shards) > 2
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert loaded.source == {"kind": "folder", "path": str(tmp_path.resolve())}
    assert _logits_diff(loaded.model, torch_model) <= TOLERANCE


def _hub_cache(tmp_path, torch_model):
    """Lay out a folder the way huggingface_hub caches the repository `tiny-org/tiny-llama`."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / REVISION
    torch_model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return tmp_path / "hub"


def test_hub_id_from_cache_folder(tmp_path):
    torch_model = make_torch_model("llama_untied_gqa")
    cache_dir = _hub_cache(tmp_path, torch_model)

    loaded = load_model("tiny-org/tiny-llama", dtype=jnp.float32, cache_dir=cache_dir)
    pinned = load_model(
        "tiny-org/tiny-llama", dtype=jnp.float32, cache_dir=cache_dir, revision=REVISION
    )

    assert loaded.source["kind"] == "hub"
    assert loaded.source["hub_id"] == "tiny-org/tiny-llama"
    assert loaded.source["revision"] == REVISION
    assert pinned.source["revision"] == REVISION
    assert _logits_diff(loaded.model, torch_model) <= TOLERANCE


def test_hub_id_missing_from_cache(tmp_path):
    cache_dir = _hub_cache(tmp_path, make_torch_model("llama_untied_gqa"))

    with pytest.raises(FileNotFoundError, match=r"cannot get 'tiny-org/other' \(revision main\)"):
        load_model("tiny-org/other", cache_dir=cache_dir)


def test_mesh_shards_parameters_and_matches(tmp_path):
    torch_model = make_torch_model("llama_untied_gqa")
    torch_model.save_pretrained(tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)

    model = load_model(tmp_path, dtype=jnp.float32, mesh=mesh).model

    q_proj = model.layers.q_proj[...]
    assert q_proj.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert q_proj.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert model.embed_tokens[...].sharding.spec == PartitionSpec(None, "fsdp")  # 101 rows
    assert model.lm_head[...].sharding.spec == PartitionSpec("fsdp", None)
    assert model.layers.gate_proj[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")

    # Four rows, so that the batch divides over data x fsdp = 4 devices.
    ids, mask, positions = (np.concatenate([array, array[:1]]) for array in padded_batch("left"))
    _, logits_ref = torch_reference(torch_model, ids, mask, positions)

    @nnx.jit
    def forward(model, ids, mask):
        return model(ids, attention_mask=mask, return_logits=True).logits

    sharded_ids = jax.device_put(jnp.asarray(ids), batch_sharding(mesh))
    sharded_mask = jax.device_put(jnp.asarray(mask), batch_sharding(mesh))
    logits = np.asarray(forward(model, sharded_ids, sharded_mask))

    assert np.abs(logits - logits_ref)[mask.astype(bool)].max() <= TOLERANCE


def test_make_mesh_rejects_wrong_device_count():
    expected = (
        r"data=3 x fsdp=1 x tensor=2 = 6 devices does not match "
        r"the 8 available; choose sizes whose product is 8"
    )
    with pytest.raises(ValueError, match=expected):
        make_mesh(data=3, fsdp=1, tensor=2)


def test_model_outlives_checkpoint_folder(tmp_path):
    """A loaded model does not depend on the checkpoint files staying on disk."""
    torch_model = make_torch_model("llama_tied_mha")
    torch_model.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model", dtype=jnp.float32)

    shutil.rmtree(tmp_path / "model")

    assert _logits_diff(loaded.model, torch_model) <= TOLERANCE
