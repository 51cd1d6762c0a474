"""The training job: validate, load the model, run estimation, train, write the soft prompt.

`run_training_job` is the one function `launch/train.py` calls. It first checks everything
cheap: the mesh against the devices, the batch against the mesh, the work directory and the
training data. So a bad setting fails in seconds, before any model weights are read, with a
message that names the flag. Then it writes the resolved config, loads the model onto the mesh,
runs the estimation stage (or reads its artifacts from `--estimation_artifacts`), trains, and
writes `final_soft_prompt.npy` with `final_soft_prompt.json` to the work directory.

Mesh rule: axes left at 0 are filled so that the mesh covers every device. `fsdp` takes the
largest share of the free devices that divides the queries of a micro-batch
(`batch_size / grad_accum_steps`), then `data` takes what still divides them, and `tensor`
takes the rest. On 8 devices with batch 10 that is fsdp=2, data=1, tensor=4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from mcd_jax.method import estimation as estimation
from mcd_jax.training.config import (
    DistributedConfig,
    MeshConfig,
    TrainConfig,
    ensure_writable_workdir,
    write_resolved_config,
)

FINAL_SOFT_PROMPT_FILE = "final_soft_prompt.npy"
FINAL_SUMMARY_FILE = "final_soft_prompt.json"
# Files that `--estimation_artifacts` reads from its folder: the names the estimation stage
# writes, so `<workdir>/estimation` of an earlier run works.
ESTIMATION_ARTIFACT_FILES = {
    "transform": estimation.TRANSFORM_FILE,
    "refusal_probe": estimation.REFUSAL_PROBE_FILE,
    "harmfulness_probe": estimation.HARMFULNESS_PROBE_FILE,
}
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
# Environment variables that mark a multi-host TPU slice or SLURM job, where
# `jax.distributed.initialize()` finds the coordinator and process ids by itself.
_CLUSTER_VARIABLES = ("TPU_WORKER_HOSTNAMES", "SLURM_STEP_NUM_TASKS")


class JobConfigurationError(ValueError):
    """A setting does not fit the devices, the batch or the data; raised before model loading."""


@dataclasses.dataclass(frozen=True)
class JobResult:
    """Outputs of a training job.

    Attributes:
        soft_prompt: The trained soft prompt, `[P, d]` float32.
        step: Steps taken in total.
        total_steps: Steps of the whole schedule.
        preempted: Whether the job stopped early on SIGTERM.
        last_metrics: The last step's loss terms and gradient norm.
        soft_prompt_path: `final_soft_prompt.npy`, or None when preempted.
    """

    soft_prompt: np.ndarray
    step: int
    total_steps: int
    preempted: bool
    last_metrics: dict[str, float]
    soft_prompt_path: Path | None


def resolve_mesh_shape(
    mesh: MeshConfig, num_devices: int, batch_size: int, grad_accum_steps: int = 1
) -> tuple[int, int, int]:
    """Fill the mesh axes left at 0 (see the module docstring) and check the result.

    Args:
        mesh: The requested axis sizes; 0 means automatic.
        num_devices: Devices of the job, over all processes.
        batch_size: Queries per batch.
        grad_accum_steps: Micro-batches per batch.

    Returns:
        `(data, fsdp, tensor)`.

    Raises:
        JobConfigurationError: If the sizes do not cover the devices, or the batch axes
            ("data" x "fsdp") do not divide the queries of a micro-batch.
    """
    if batch_size % grad_accum_steps:
        raise JobConfigurationError(
            f"--grad_accum_steps={grad_accum_steps} does not divide --batch_size={batch_size}; "
            "choose a divisor of the batch size"
        )
    micro_queries = batch_size // grad_accum_steps
    sizes = {"fsdp": mesh.fsdp, "data": mesh.data, "tensor": mesh.tensor}
    fixed = math.prod(size for size in sizes.values() if size)
    if num_devices % fixed:
        raise JobConfigurationError(
            f"--mesh_data={mesh.data} x --mesh_fsdp={mesh.fsdp} x --mesh_tensor={mesh.tensor} "
            f"(0 = automatic) does not divide the {num_devices} devices; choose sizes whose "
            f"product is {num_devices}"
        )

    free = num_devices // fixed
    for axis in ("fsdp", "data", "tensor"):
        if sizes[axis]:
            continue
        if axis == "tensor":
            sizes[axis] = free
        else:
            batch_ways = math.prod(sizes[a] for a in ("fsdp", "data") if sizes[a])
            sizes[axis] = math.gcd(free, micro_queries // batch_ways if batch_ways else 1)
        free //= sizes[axis]

    data, fsdp, tensor = sizes["data"], sizes["fsdp"], sizes["tensor"]
    if data * fsdp * tensor != num_devices:
        raise JobConfigurationError(
            f"the mesh data={data} x fsdp={fsdp} x tensor={tensor} covers "
            f"{data * fsdp * tensor} of the {num_devices} devices; set --mesh_data, "
            "--mesh_fsdp and --mesh_tensor so that their product is the device count"
        )
    if micro_queries % (data * fsdp):
        raise JobConfigurationError(
            f"the batch axes data={data} x fsdp={fsdp} = {data * fsdp} do not divide the "
            f"{micro_queries} queries of a micro-batch (--batch_size={batch_size} / "
            f"--grad_accum_steps={grad_accum_steps}); choose a batch size divisible by "
            f"{data * fsdp}, or move devices to --mesh_tensor"
        )
    return data, fsdp, tensor


def initialize_distributed(settings: DistributedConfig) -> None:
    """Start `jax.distributed` when coordinator flags are given or a TPU pod/SLURM job is seen.

    Call it before anything touches the devices.
    """
    if settings.coordinator_address is not None:
        logging.info(
            "Joining the distributed job at %s as process %s of %s",
            settings.coordinator_address,
            settings.process_id,
            settings.num_processes,
        )
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
        return
    # NOTE: this automatic path is untested. It relies on JAX's own cluster detection for Cloud
    # TPU and SLURM.
    detected = [name for name in _CLUSTER_VARIABLES if os.environ.get(name)]
    multi_host = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or (
        int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
    )
    if detected and multi_host:
        logging.info("Detected a multi-host cluster (%s); starting jax.distributed", detected)
        jax.distributed.initialize()


def load_estimation_artifacts(folder: str | os.PathLike[str]):
    """Read a transform and both probes from `folder` (file names in ESTIMATION_ARTIFACT_FILES).

    Raises:
        JobConfigurationError: If a file is missing.
    """
    from mcd_jax.method.probes import LinearProbe
    from mcd_jax.method.transform import Transform
    from mcd_jax.training.step import MethodArrays

    folder = Path(folder).expanduser()
    missing = [name for name in ESTIMATION_ARTIFACT_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise JobConfigurationError(
            f"--estimation_artifacts={folder} lacks {missing}; point it at a folder with "
            f"{sorted(ESTIMATION_ARTIFACT_FILES.values())}, or unset it to run estimation"
        )
    return MethodArrays(
        transform=Transform.load(folder / ESTIMATION_ARTIFACT_FILES["transform"]),
        refusal_probe=LinearProbe.load(folder / ESTIMATION_ARTIFACT_FILES["refusal_probe"]),
        harmfulness_probe=LinearProbe.load(folder / ESTIMATION_ARTIFACT_FILES["harmfulness_probe"]),
    )


def run_estimation_stage(loaded: Any, config: TrainConfig, mesh: Mesh | None):
    """Run (or reuse) the estimation stage in the work directory; return its `MethodArrays`."""
    from mcd_jax.training.step import MethodArrays

    result = estimation.run_estimation(
        loaded,
        estimation.settings_from_config(config),
        Path(config.checkpoint.workdir),
        mesh=mesh,
    )
    return MethodArrays(
        transform=result.transform,
        refusal_probe=result.refusal_probe,
        harmfulness_probe=result.harmfulness_probe,
    )


def model_id(source: dict[str, Any]) -> str:
    """Identify the weights from a `LoadedModel.source` record: its SHA-256 if it has one."""
    if source.get("sha256"):
        return str(source["sha256"])
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def _validate(config: TrainConfig) -> TrainConfig:
    """Run the cheap checks and return the config with the mesh resolved."""
    settings = config.schedule
    shape = resolve_mesh_shape(
        config.mesh, jax.device_count(), settings.batch_size, settings.grad_accum_steps
    )
    try:
        ensure_writable_workdir(config.checkpoint.workdir)
    except ValueError as err:
        raise JobConfigurationError(str(err)) from err
    if config.estimation.artifacts is not None:
        load_estimation_artifacts(config.estimation.artifacts)
    return dataclasses.replace(config, mesh=MeshConfig(*shape))


def run_training_job(
    config: TrainConfig,
    *,
    estimate: Callable[[Any, TrainConfig, Mesh | None], Any] | None = None,
) -> JobResult:
    """Run a whole training job as configured.

    Args:
        config: The run's configuration (from `mcd_jax.flags.config_from_flags`).
        estimate: Replaces the estimation stage: called with the loaded model, the config and
            the mesh, it returns `MethodArrays`. Default: `--estimation_artifacts` when set,
            else `run_estimation_stage`.

    Returns:
        The trained soft prompt and the run's progress.

    Raises:
        JobConfigurationError: Before any model is loaded, if the mesh, batch, work directory,
            estimation artifacts or training data are invalid.
        FingerprintMismatchError: Right after loading the model, if the work directory belongs
            to a run with other settings (unless `force_resume`); nothing in it is changed.
    """
    from mcd_jax.models.loading import load_model
    from mcd_jax.sharding import make_mesh
    from mcd_jax.training.checkpointing import check_fingerprint
    from mcd_jax.training.data import load_training_set
    from mcd_jax.training.trainer import run_fingerprint, train

    initialize_distributed(config.distributed)
    config = _validate(config)
    try:
        training_set = load_training_set(config.data.dataset, config.data.train_languages)
    except (ValueError, FileNotFoundError) as err:
        raise JobConfigurationError(f"invalid training data: {err}") from err
    workdir = Path(config.checkpoint.workdir)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)

    started = time.perf_counter()
    logging.info("Stage start: loading model %s", config.model.ref)
    loaded = load_model(
        config.model.ref,
        dtype=_DTYPES[config.model.dtype],
        mesh=mesh,
        revision=config.model.revision,
    )
    logging.info("Stage end: model loaded in %.1f s", time.perf_counter() - started)

    # A work directory of another run fails here, before anything in it is overwritten.
    fingerprint = run_fingerprint(loaded, config, training_set, model_id(loaded.source))
    check_fingerprint(workdir, fingerprint, force=config.checkpoint.force_resume)
    if jax.process_index() == 0:
        from mcd_jax.export import ModelDescription, write_model_record

        write_resolved_config(config, workdir)
        # launch/export.py checks its target model against this record.
        write_model_record(workdir, ModelDescription.from_loaded(loaded))

    started = time.perf_counter()
    logging.info("Stage start: estimation")
    if estimate is None and config.estimation.artifacts is not None:
        method = load_estimation_artifacts(config.estimation.artifacts)
    else:
        method = (estimate or run_estimation_stage)(loaded, config, mesh)
    logging.info("Stage end: estimation in %.1f s", time.perf_counter() - started)

    result = train(
        loaded, config, method, training_set, model_id=model_id(loaded.source), mesh=mesh
    )
    path = None
    if result.finished and jax.process_index() == 0:
        path = write_final_soft_prompt(workdir, result, config, loaded.source)
    if result.preempted:
        logging.warning(
            "Stopped at step %d of %d after a preemption signal; run the same command again to "
            "resume from %s",
            result.step,
            result.total_steps,
            workdir,
        )
    return JobResult(
        soft_prompt=result.soft_prompt,
        step=result.step,
        total_steps=result.total_steps,
        preempted=result.preempted,
        last_metrics=result.last_metrics,
        soft_prompt_path=path,
    )


def write_final_soft_prompt(
    workdir: Path, result: Any, config: TrainConfig, source: dict[str, Any]
) -> Path:
    """Write `final_soft_prompt.npy` and its JSON summary atomically; return the `.npy` path."""
    path = workdir / FINAL_SOFT_PROMPT_FILE
    temporary = workdir / f".{FINAL_SOFT_PROMPT_FILE}.tmp"
    with open(temporary, "wb") as file:
        np.save(file, np.asarray(result.soft_prompt, np.float32))
    os.replace(temporary, path)

    summary = {
        "soft_prompt_file": FINAL_SOFT_PROMPT_FILE,
        "shape": list(result.soft_prompt.shape),
        "steps": result.step,
        "model": config.model.ref,
        "model_source": source,
        "placement": config.method.placement,
        "text_prompt": config.method.text_prompt,
        "mode": config.method.mode,
        "schedule": config.schedule.schedule,
        "train_languages": list(config.data.train_languages),
        "final_metrics": result.last_metrics,
    }
    summary_path = workdir / FINAL_SUMMARY_FILE
    temporary = workdir / f".{FINAL_SUMMARY_FILE}.tmp"
    temporary.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(temporary, summary_path)
    logging.info("Wrote the final soft prompt %s to %s", result.soft_prompt.shape, path)
    return path
