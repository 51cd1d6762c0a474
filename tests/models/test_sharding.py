"""Logical axis rules, mesh construction and per-parameter shardings."""

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from mcd_jax.models import ModelConfig, Transformer
from mcd_jax.sharding import logical_to_spec, make_mesh, parameter_shardings


def _config(num_kv_heads: int) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=6,
        num_kv_heads=num_kv_heads,
        head_dim=8,
    )


def test_rules_map_logical_axes():
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"))

    assert spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert logical_to_spec(("batch", "seq")) == PartitionSpec(("data", "fsdp"), None)


def test_undivisible_axis_is_replicated():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)

    spec = logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 3, 8), mesh)

    assert spec == PartitionSpec("fsdp", None, None)


def test_unknown_logical_axis():
    with pytest.raises(KeyError, match=r"logical axis 'experts' has no sharding rule"):
        logical_to_spec(("experts",))


def test_every_parameter_gets_a_sharding():
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    abstract = nnx.eval_shape(lambda: Transformer(_config(2), dtype=jnp.float32, rngs=nnx.Rngs(0)))

    shardings = nnx.to_flat_state(parameter_shardings(nnx.state(abstract), mesh))
    specs = {path: sharding.spec for path, sharding in shardings}

    assert specs[("layers", "q_proj")] == PartitionSpec(None, "fsdp", None, None)  # 6 heads
    assert specs[("layers", "k_proj")] == PartitionSpec(None, "fsdp", None, None)  # 2 heads
    assert specs[("layers", "gate_proj")] == PartitionSpec(None, "fsdp", "tensor")
    assert specs[("layers", "attn_norm")] == PartitionSpec(None, None)
    assert specs[("lm_head",)] == PartitionSpec("fsdp", "tensor")
    assert len(specs) == 12


def test_make_mesh_axis_order():
    mesh = make_mesh(data=2, fsdp=1, tensor=4)

    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}


def test_make_mesh_rejects_zero_axis():
    with pytest.raises(ValueError, match=r"mesh axis fsdp=0 is invalid"):
        make_mesh(data=8, fsdp=0)
