"""One process of a multi-process training run on CPU, started by test_multihost.py.

Usage:
  python multihost_worker.py --inputs DIR --workdir DIR --num_processes N --process_id I
      [--port PORT]

Set `XLA_FLAGS=--xla_force_host_platform_device_count=K` for K local CPU devices. With
N > 1 the process joins a `jax.distributed` run whose coordinator listens on
127.0.0.1:PORT, and the processes all-reduce over gloo on the loopback interface.

The inputs folder contains a model folder (`model/`, safetensors and config.json) and the
run's arrays as `.npy` files (see `write_inputs` in test_multihost.py). Each step takes the
global batch `order[step * batch : (step + 1) * batch]`, and each process reads from disk
only the rows that its own devices hold. Process 0 alone writes `metrics.jsonl` and
`soft_prompt.npy` to the work directory. Every process prints one `rows <step> <first>
<stop>` line per step, so the test can check which rows it read.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import logging  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from mcd_jax.method.objective import ObjectiveConfig, TextPromptCache, objective_from_targets  # noqa: E402
from mcd_jax.method.probes import LinearProbe  # noqa: E402
from mcd_jax.method.transform import Transform  # noqa: E402
from mcd_jax.models import load_model  # noqa: E402
from mcd_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from mcd_jax.soft_prompt import splice_soft_prompt  # noqa: E402
from mcd_jax.states import last_position_states  # noqa: E402
from mcd_jax.training.metrics import MetricsWriter  # noqa: E402

# The mesh every run uses: fsdp spans the two processes, tensor the devices of one process.
MESH_SHAPE = {"data": 1, "fsdp": 2, "tensor": 2}
BATCH_FIELDS = ("input_ids", "attention_mask", "position_ids", "slot_positions")


def join_on_loopback(port: int, num_processes: int, process_id: int) -> None:
    """Join the distributed run, keeping the coordinator and gloo on 127.0.0.1.

    `jax.distributed.initialize` binds the coordinator to every interface unless given a
    bind address, and gloo resolves the host name to pick its address. Both are pinned to the
    loopback address here. Pinning gloo goes through `jax._src.xla_bridge`, a private
    module of JAX 0.10.2, because JAX offers no public way to pass gloo a host name.
    """
    from jax._src import distributed, xla_bridge
    from jax._src.lib import _jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = f"127.0.0.1:{port}"
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )

    def loopback_cpu_client():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname="127.0.0.1"
        )
        return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory("cpu", loopback_cpu_client, priority=0, fail_quietly=False)


def global_array(host_value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array, identical on every process, onto a global sharding."""
    return jax.make_array_from_callback(host_value.shape, sharding, lambda index: host_value[index])


def local_rows(sharding: NamedSharding, batch: int) -> tuple[int, int]:
    """Return the `[first, stop)` rows of a global batch that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map((batch,)).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [batch if index[0].stop is None else index[0].stop for index in indices]
    return min(starts), max(stops)


def load_method(
    inputs: Path, mesh: Mesh
) -> tuple[Transform, LinearProbe, LinearProbe, TextPromptCache]:
    """Read the transform, the probes and the text-prompt cache, replicated on the mesh."""
    replicated = NamedSharding(mesh, PartitionSpec())
    meta = json.loads((inputs / "meta.json").read_text())

    def read(name: str) -> jax.Array:
        return global_array(np.load(inputs / f"{name}.npy"), replicated)

    transform = Transform(
        mean=read("transform_mean"),
        basis=read("transform_basis"),
        explained_variance_ratio=read("transform_ratio"),
        num_components=meta["num_components"],
    )
    refusal = LinearProbe(weight=read("refusal_weight"), bias=read("refusal_bias"))
    harmfulness = LinearProbe(weight=read("harmfulness_weight"), bias=read("harmfulness_bias"))
    cache = TextPromptCache(
        refusal_logits=read("cache_refusal_logits"),
        harmfulness_logits=read("cache_harmfulness_logits"),
        complement=read("cache_complement"),
        consistency=read("cache_consistency"),
        languages=tuple(meta["languages"]),
    )
    return transform, refusal, harmfulness, cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4, 5))
def train_step(graphdef, optimizer, config, model_state, soft_prompt, opt_state, batch, method):
    """Take one AdamW step on the soft prompt and return it, the optimizer state and the terms."""
    model = nnx.merge(graphdef, model_state)
    transform, refusal, harmfulness, cache = method

    def loss(prompt):
        embeds = splice_soft_prompt(
            model.embed(batch["input_ids"]), prompt, batch["slot_positions"]
        )
        states = last_position_states(model, embeds, batch["attention_mask"], batch["position_ids"])
        targets = cache.batch(batch["language"], batch["example_indices"])
        return objective_from_targets(
            states, targets, batch["labels"], transform, refusal, harmfulness, config
        )

    (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(soft_prompt)
    updates, opt_state = optimizer.update(grads, opt_state, soft_prompt)
    return optax.apply_updates(soft_prompt, updates), opt_state, terms


def read_step_batch(inputs: Path, step: int, batch: int, mesh: Mesh) -> dict[str, jax.Array]:
    """Read this process's rows of one step's global batch and assemble the global arrays."""
    order = np.load(inputs / "order.npy", mmap_mode="r")
    rows_sharding = batch_sharding(mesh, ndim=1)
    first, stop = local_rows(rows_sharding, batch)
    rows = np.asarray(order[step * batch + first : step * batch + stop])
    print(f"rows {step} {first} {stop}", flush=True)

    arrays = {}
    for name in (*BATCH_FIELDS, "labels", "example_indices"):
        table = np.load(inputs / f"{name}.npy", mmap_mode="r")
        local = np.ascontiguousarray(table[rows])
        sharding = batch_sharding(mesh, ndim=local.ndim)
        arrays[name] = jax.make_array_from_process_local_data(
            sharding, local, (batch, *local.shape[1:])
        )
    language = np.load(inputs / "language.npy")[step]
    arrays["language"] = global_array(np.asarray(language), NamedSharding(mesh, PartitionSpec()))
    return arrays


def train(inputs: Path, workdir: Path) -> None:
    """Train the soft prompt for the run in `inputs`. Process 0 alone writes the results."""
    meta = json.loads((inputs / "meta.json").read_text())
    mesh = make_mesh(**MESH_SHAPE)
    loaded = load_model(inputs / "model", dtype=jnp.float32, mesh=mesh)
    graphdef, model_state = nnx.split(loaded.model)
    method = load_method(inputs, mesh)

    replicated = NamedSharding(mesh, PartitionSpec())
    soft_prompt = global_array(np.load(inputs / "soft_prompt_init.npy"), replicated)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(soft_prompt)
    config = ObjectiveConfig()

    with MetricsWriter(workdir, log_every=1, tensorboard=False, progress_bar=False) as metrics:
        for step in range(meta["num_steps"]):
            batch = read_step_batch(inputs, step, meta["batch_size"], mesh)
            soft_prompt, opt_state, terms = train_step(
                graphdef, optimizer, config, model_state, soft_prompt, opt_state, batch, method
            )
            metrics.write(step + 1, terms)

    # A collective: every process takes part, process 0 alone writes the result.
    final = multihost_utils.process_allgather(soft_prompt, tiled=True)
    if jax.process_index() == 0:
        np.save(workdir / "soft_prompt.npy", final)
    print(f"done process {jax.process_index()} of {jax.process_count()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)

    if args.num_processes > 1:
        join_on_loopback(args.port, args.num_processes, args.process_id)
    train(args.inputs, args.workdir)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
