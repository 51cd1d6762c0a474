"""Logical axis names -> mesh axes, in one place.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism that
also shards the model dimension of every weight) and `tensor` (tensor parallelism over
attention heads, MLP units and the vocabulary). Model parameters name their axes
logically (see `mcd_jax.models.transformer`); `LOGICAL_AXIS_RULES` decides where each
logical axis goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes), None for replicated.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "seq": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Build a ("data", "fsdp", "tensor") mesh.

    Args:
      data: size of the data-parallel axis.
      fsdp: size of the fully sharded data-parallel axis.
      tensor: size of the tensor-parallel axis.
      devices: the devices to use; defaults to `jax.devices()`.

    Returns:
      A mesh over exactly `data * fsdp * tensor` devices.

    Raises:
      ValueError: a size is below 1, or the product differs from the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"mesh axis {name}={size} is invalid; every axis needs size >= 1.")
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh shape data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
            f"devices does not match the {len(devices)} available; choose sizes whose product "
            f"is {len(devices)}."
        )
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """Translate logical axis names to a PartitionSpec with `LOGICAL_AXIS_RULES`.

    When `shape` and `mesh` are given, a dimension the mesh axes do not divide is
    replicated instead (with a log line), e.g. 3 key/value heads on a tensor axis of 2.

    Args:
      logical_axes: one name (or None) per array dimension.
      shape: the array shape, for the divisibility check.
      mesh: the mesh, for the divisibility check.

    Returns:
      The PartitionSpec.

    Raises:
      KeyError: a logical axis name has no rule.
    """
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise KeyError(
                f"logical axis {name!r} has no sharding rule; known axes: "
                f"{', '.join(LOGICAL_AXIS_RULES)}."
            )
        mesh_axes = None if name is None else LOGICAL_AXIS_RULES[name]
        if mesh_axes is not None and shape is not None and mesh is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            ways = int(np.prod([mesh.shape[axis] for axis in names]))
            if shape[dim] % ways != 0:
                logging.info(
                    "Replicating logical axis %s (size %d): mesh axes %s of size %d do not "
                    "divide it.", name, shape[dim], mesh_axes, ways,
                )  # fmt: skip
                mesh_axes = None
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Return the NamedSharding of one parameter from its `logical_axes` metadata."""
    axes = variable.get_metadata().get("logical_axes")
    shape = variable.shape
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def parameter_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Map every parameter of a model state (real or abstract) to its NamedSharding.

    Args:
      state: e.g. `nnx.state(model)` or the state of `nnx.eval_shape(...)`.
      mesh: the mesh to place parameters on.

    Returns:
      A state of the same structure whose leaves are NamedShardings.
    """
    return jax.tree.map(
        lambda variable: variable_sharding(variable, mesh),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Shard the leading (batch) axis over ("data", "fsdp"); replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_AXIS_RULES["batch"], *([None] * (ndim - 1))))


def to_host(array: jax.Array) -> np.ndarray:
    """Copy an array to host memory, gathering the shards other processes hold.

    `np.asarray` cannot read an array that spans devices of several processes (a
    multi-host mesh), so such arrays are all-gathered first. Every process must call
    this for the same array, since the gather is a collective.
    """
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def replicated_key(seed: int, mesh: Mesh | None) -> jax.Array:
    """Make a typed PRNG key, replicated over the mesh so a multi-process save accepts it."""
    if mesh is None:
        return jax.random.key(seed)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated)()
