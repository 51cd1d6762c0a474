"""One process of a multi-process run on CPU, started by test_multihost.py.

Usage:
  python multihost_worker.py step --inputs DIR --workdir DIR
      [--num_processes N --process_id I --port PORT]
  python multihost_worker.py job LAUNCH_TRAIN_FLAGS...

Set `XLA_FLAGS=--xla_force_host_platform_device_count=K` for K local CPU devices. Both
modes keep every socket on 127.0.0.1 (see `pin_to_loopback`).

`step` runs the jitted training step (`mcd_jax.training.step.TrainStep`) on arrays that the
test wrote to the inputs folder: a model folder (`model/`) and `.npy` files. Each step takes
the global batch `order[step * batch : (step + 1) * batch]`. Each process reads from disk
only the rows that its own devices hold, and prints one `rows <step> <first> <stop>` line
per step. Process 0 alone writes `metrics.jsonl` and `soft_prompt.npy` to the work directory.

`job` runs `launch/train.py` with the given flags, as a user starts each process of a job.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from mcd_jax.method.objective import ObjectiveConfig  # noqa: E402
from mcd_jax.method.probes import LinearProbe  # noqa: E402
from mcd_jax.method.transform import Transform  # noqa: E402
from mcd_jax.models import load_model  # noqa: E402
from mcd_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from mcd_jax.training import step as training_step  # noqa: E402
from mcd_jax.training.metrics import MetricsWriter  # noqa: E402

LAUNCH_TRAIN = Path(__file__).resolve().parents[2] / "launch" / "train.py"
# The mesh of the `step` mode: fsdp spans the two processes, tensor the devices of one.
MESH_SHAPE = {"data": 1, "fsdp": 2, "tensor": 2}
# The batch arrays of the "one_language" step layout, one row per query.
BATCH_FIELDS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "slot_positions",
    "labels",
    "refusal_logits",
    "harmfulness_logits",
    "complement",
    "consistency",
)


def pin_to_loopback() -> None:
    """Keep gloo on 127.0.0.1; call before anything touches the devices.

    Gloo picks its address by resolving the host name unless it is given one. The only way
    to give it one in JAX 0.10.2 is to register the CPU backend factory again through the
    private `jax._src.xla_bridge` module. The coordinator binds to every interface unless
    `coordinator_bind_address` or `JAX_COORDINATOR_BIND_ADDRESS` names one, so callers of
    `jax.distributed.initialize` set that to 127.0.0.1 too.
    """
    from jax._src import distributed, xla_bridge
    from jax._src.lib import _jax

    def loopback_cpu_client():
        collectives = None
        if distributed.global_state.client is not None:
            collectives = _jax.make_gloo_tcp_collectives(
                distributed_client=distributed.global_state.client, hostname="127.0.0.1"
            )
        return xla_bridge.make_cpu_client(collectives=collectives)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def load_method(inputs: Path, mesh: Mesh) -> training_step.MethodArrays:
    """Read the transform and the probes, replicated on the mesh."""
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
    return training_step.MethodArrays(
        transform=transform,
        refusal_probe=LinearProbe(weight=read("refusal_weight"), bias=read("refusal_bias")),
        harmfulness_probe=LinearProbe(
            weight=read("harmfulness_weight"), bias=read("harmfulness_bias")
        ),
    )


def read_step_batch(inputs: Path, step: int, batch: int, mesh: Mesh) -> dict[str, jax.Array]:
    """Read this process's rows of one step's global batch and assemble the global arrays."""
    order = np.load(inputs / "order.npy", mmap_mode="r")
    first, stop = local_rows(batch_sharding(mesh, ndim=1), batch)
    rows = np.asarray(order[step * batch + first : step * batch + stop])
    print(f"rows {step} {first} {stop}", flush=True)

    arrays = {}
    for name in BATCH_FIELDS:
        table = np.load(inputs / f"{name}.npy", mmap_mode="r")
        local = np.ascontiguousarray(table[rows])
        arrays[name] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, ndim=local.ndim), local, (batch, *local.shape[1:])
        )
    return arrays


def train_steps(inputs: Path, workdir: Path) -> None:
    """Train the soft prompt on the run in `inputs`. Process 0 alone writes the results."""
    meta = json.loads((inputs / "meta.json").read_text())
    mesh = make_mesh(**MESH_SHAPE)
    loaded = load_model(inputs / "model", dtype=jnp.float32, mesh=mesh)
    graphdef, model_state = nnx.split(loaded.model)
    method = load_method(inputs, mesh)

    replicated = NamedSharding(mesh, PartitionSpec())
    soft_prompt = global_array(np.load(inputs / "soft_prompt_init.npy"), replicated)
    optimizer = training_step.make_optimizer(learning_rate=1e-2)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(soft_prompt)
    config = training_step.StepConfig(ObjectiveConfig())
    step_fn = training_step.TrainStep(graphdef, model_state, optimizer, config, mesh)

    with MetricsWriter(workdir, log_every=1, tensorboard=False, progress_bar=False) as metrics:
        for step in range(meta["num_steps"]):
            batch = read_step_batch(inputs, step, meta["batch_size"], mesh)
            soft_prompt, opt_state, terms = step_fn(
                soft_prompt, opt_state, model_state, method, batch
            )
            metrics.write(step + 1, terms)

    # A collective: every process takes part, and process 0 alone writes the result.
    final = multihost_utils.process_allgather(soft_prompt, tiled=True)
    if jax.process_index() == 0:
        np.save(workdir / "soft_prompt.npy", final)
    print(f"done process {jax.process_index()} of {jax.process_count()}", flush=True)


def run_step_mode(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="multihost_worker.py step")
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)

    if args.num_processes > 1:
        address = f"127.0.0.1:{args.port}"
        jax.distributed.initialize(
            coordinator_address=address,
            coordinator_bind_address=address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    train_steps(args.inputs, args.workdir)
    if args.num_processes > 1:
        jax.distributed.shutdown()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("step", "job"):
        raise SystemExit(f"usage: {sys.argv[0]} step|job ARGS...; got {sys.argv[1:2]}")
    pin_to_loopback()
    if sys.argv[1] == "step":
        run_step_mode(sys.argv[2:])
        return
    sys.argv = [str(LAUNCH_TRAIN), *sys.argv[2:]]
    runpy.run_path(str(LAUNCH_TRAIN), run_name="__main__")


if __name__ == "__main__":
    main()
