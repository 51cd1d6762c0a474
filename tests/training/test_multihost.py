"""Two processes on 127.0.0.1 train the soft prompt to the same result as one process.

Each comparison starts multihost_worker.py as one process with 4 local CPU devices, and as
the two processes of one `jax.distributed` run with 2 local CPU devices each, joined over
gloo on the loopback interface. Both use the ("data", "fsdp", "tensor") = (1, 2, 2) mesh, so
in the two-process run the fsdp axis, and with it the batch and the weights' model
dimension, spans the processes.

- The step tests run `TrainStep` on a tiny random Llama model and arrays written to disk.
- The job test runs `launch/train.py` with configs/tiny_test.cfg on a tiny model with the
  SmolLM2 tokenizer, the built-in training data and fixed estimation artifacts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mcd_jax.method.objective import precompute_text_prompt_cache
from mcd_jax.method.probes import LinearProbe
from mcd_jax.method.transform import Transform

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).parent))
from test_step_support import (  # noqa: E402
    TINY_CONFIG,
    build_tiny_model_folder,
    write_estimation_artifacts,
    write_small_dataset,
)
from tiny_models import make_torch_model  # noqa: E402

WORKER = Path(__file__).with_name("multihost_worker.py")
LANGUAGES = ("en", "da")
NUM_QUERIES = 16
SEQ = 16
SOFT_PROMPT_LENGTH = 3
NUM_COMPONENTS = 4
BATCH_SIZE = 8
NUM_STEPS = 4
PROCESS_TIMEOUT_S = 150
# The job test: training pairs per language and the hidden size of the tiny model folder.
JOB_PAIRS = 16
JOB_HIDDEN_SIZE = 64

# Measured with JAX 0.10.2 on a 2-core x86 CPU: the two runs agree bitwise. The bound leaves
# room for a gloo all-reduce that sums in another order than the in-process one.
LOSS_RTOL = 1e-5
PROMPT_ATOL = 1e-6


def write_step_inputs(folder: Path) -> dict[str, np.ndarray]:
    """Write the tiny model and the step run's arrays to `folder` and return the arrays."""
    make_torch_model("llama_untied_gqa", seed=3).save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    rows = len(LANGUAGES) * NUM_QUERIES
    hidden = 64

    lengths = rng.integers(SOFT_PROMPT_LENGTH + 4, SEQ + 1, size=rows)
    padding = SEQ - lengths
    columns = np.arange(SEQ)[None, :]
    attention_mask = (columns >= padding[:, None]).astype(np.int32)
    arrays = {
        "input_ids": np.where(attention_mask, rng.integers(1, 101, size=(rows, SEQ)), 0),
        "attention_mask": attention_mask,
        "position_ids": np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0),
        # The system slot sits after the first real token of each row.
        "slot_positions": padding[:, None] + 1 + np.arange(SOFT_PROMPT_LENGTH)[None, :],
        "labels": np.arange(rows) % 2,
    }
    arrays = {name: value.astype(np.int32) for name, value in arrays.items()}

    # Two steps per language: each language's rows in a shuffled order, as a schedule would.
    steps_per_language = NUM_STEPS // len(LANGUAGES)
    order = []
    for index in range(len(LANGUAGES)):
        shuffled = index * NUM_QUERIES + rng.permutation(NUM_QUERIES)
        order.append(shuffled[: steps_per_language * BATCH_SIZE])
    arrays["order"] = np.concatenate(order).astype(np.int64)

    basis, _ = np.linalg.qr(rng.normal(size=(hidden, hidden)))
    transform = Transform(
        mean=rng.normal(size=hidden).astype(np.float32) * 0.1,
        basis=basis.astype(np.float32),
        explained_variance_ratio=np.full(NUM_COMPONENTS, 0.1, np.float32),
        num_components=NUM_COMPONENTS,
    )
    refusal = LinearProbe(rng.normal(size=NUM_COMPONENTS).astype(np.float32), np.float32(0.2))
    harmfulness = LinearProbe(rng.normal(size=NUM_COMPONENTS).astype(np.float32), np.float32(0))
    states = rng.normal(size=(len(LANGUAGES), NUM_QUERIES, hidden)).astype(np.float32)
    cache = precompute_text_prompt_cache(states, LANGUAGES, transform, refusal, harmfulness)

    arrays.update(
        soft_prompt_init=rng.normal(size=(SOFT_PROMPT_LENGTH, hidden)).astype(np.float32) * 0.1,
        transform_mean=transform.mean,
        transform_basis=transform.basis,
        transform_ratio=transform.explained_variance_ratio,
        refusal_weight=refusal.weight,
        refusal_bias=refusal.bias,
        harmfulness_weight=harmfulness.weight,
        harmfulness_bias=harmfulness.bias,
        # The step reads each row's cached targets: row r is query r % NUM_QUERIES in
        # language r // NUM_QUERIES.
        refusal_logits=np.tile(cache.refusal_logits, len(LANGUAGES)),
        harmfulness_logits=np.tile(cache.harmfulness_logits, len(LANGUAGES)),
        complement=np.asarray(cache.complement).reshape(rows, -1),
        consistency=np.asarray(cache.consistency).reshape(rows, -1),
    )
    for name, value in arrays.items():
        np.save(folder / f"{name}.npy", np.asarray(value))
    meta = {
        "num_components": NUM_COMPONENTS,
        "languages": list(LANGUAGES),
        "batch_size": BATCH_SIZE,
        "num_steps": NUM_STEPS,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return arrays


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_worker(log: Path, devices: int, arguments: list[str], env: dict | None = None):
    """Start multihost_worker.py with `devices` local CPU devices, writing to `log`."""
    process_env = {**os.environ, **(env or {})}
    process_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    process_env["JAX_PLATFORMS"] = "cpu"
    with log.open("w") as stream:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *arguments],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=process_env,
        )


def process_flags(port: int, process_id: int) -> list[str]:
    return ["--num_processes", "2", "--process_id", str(process_id), "--port", str(port)]


def wait_all(processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every process. On a timeout, kill the ones still running by PID and fail."""
    try:
        for process in processes:
            process.wait(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"a worker ran past {PROCESS_TIMEOUT_S} s and was killed:\n{tails}")
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, (
            f"{log.name} exited {process.returncode}:\n" + (log.read_text()[-3000:])
        )


def read_losses(workdir: Path) -> np.ndarray:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, NUM_STEPS + 1))
    return np.asarray([[row[name] for name in ("total", "refusal", "complement")] for row in rows])


def rows_read(log: Path) -> list[tuple[int, int, int]]:
    lines = [line.split() for line in log.read_text().splitlines() if line.startswith("rows ")]
    return [(int(step), int(first), int(stop)) for _, step, first, stop in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run the step as one process and as two processes on the same inputs."""
    root = tmp_path_factory.mktemp("multihost_step")
    inputs = root / "inputs"
    inputs.mkdir()
    write_step_inputs(inputs)

    single, shared = root / "single", root / "two_processes"
    port = free_loopback_port()
    logs = [root / "single.log", root / "process0.log", root / "process1.log"]
    common = ["step", "--inputs", str(inputs), "--workdir"]
    processes = [start_worker(logs[0], 4, [*common, str(single)])]
    for process_id in (0, 1):
        arguments = [*common, str(shared), *process_flags(port, process_id)]
        processes.append(start_worker(logs[1 + process_id], 2, arguments))
    wait_all(processes, logs)
    return {"inputs": inputs, "single": single, "shared": shared, "root": root}


def test_two_processes_match_one(runs):
    single_losses = read_losses(runs["single"])
    shared_losses = read_losses(runs["shared"])
    np.testing.assert_allclose(shared_losses, single_losses, rtol=LOSS_RTOL)

    single_prompt = np.load(runs["single"] / "soft_prompt.npy")
    shared_prompt = np.load(runs["shared"] / "soft_prompt.npy")
    np.testing.assert_allclose(shared_prompt, single_prompt, rtol=0, atol=PROMPT_ATOL)


def test_training_moves_soft_prompt(runs):
    initial = np.load(runs["inputs"] / "soft_prompt_init.npy")
    trained = np.load(runs["shared"] / "soft_prompt.npy")
    assert trained.shape == initial.shape
    # Four AdamW steps of size about 1e-2 per coordinate.
    assert np.abs(trained - initial).max() > 5e-3


def test_each_process_reads_its_half(runs):
    half = BATCH_SIZE // 2
    for process_id in (0, 1):
        expected = [(step, process_id * half, (process_id + 1) * half) for step in range(NUM_STEPS)]
        assert rows_read(runs["root"] / f"process{process_id}.log") == expected
    assert rows_read(runs["root"] / "single.log") == [
        (step, 0, BATCH_SIZE) for step in range(NUM_STEPS)
    ]


def test_only_process_zero_writes(runs):
    written = sorted(path.name for path in runs["shared"].iterdir())
    assert written == ["metrics.jsonl", "soft_prompt.npy"]
    for process_id in (0, 1):
        log = (runs["root"] / f"process{process_id}.log").read_text()
        assert f"done process {process_id} of 2" in log
    # MetricsWriter logs a summary line per step, on process 0 only.
    assert "INFO:absl:step 1 " in (runs["root"] / "process0.log").read_text()
    assert "INFO:absl:step 1 " not in (runs["root"] / "process1.log").read_text()


@pytest.fixture(scope="module")
def job_inputs(smollm2_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Write a tiny model with the SmolLM2 tokenizer, a small dataset and estimation files."""
    root = tmp_path_factory.mktemp("multihost_job")
    model = build_tiny_model_folder(smollm2_tokenizer, root / "model")
    dataset = write_small_dataset(root / "train.jsonl", JOB_PAIRS, LANGUAGES)
    # Only the shapes of the transform and the probes matter here, so random states will do.
    states = np.random.default_rng(0).normal(size=(4 * JOB_HIDDEN_SIZE, JOB_HIDDEN_SIZE))
    artifacts = write_estimation_artifacts(states.astype(np.float32), root / "estimation")
    return {"root": root, "model": model, "dataset": dataset, "artifacts": artifacts}


def job_flags(job_inputs: dict[str, Path], workdir: Path) -> list[str]:
    return [
        f"--flagfile={TINY_CONFIG}",
        f"--model={job_inputs['model']}",
        f"--dataset={job_inputs['dataset']}",
        f"--estimation_artifacts={job_inputs['artifacts']}",
        f"--workdir={workdir}",
        "--mesh_data=1",
        "--mesh_fsdp=2",
        "--mesh_tensor=2",
        "--epochs_per_language=1",
    ]


def test_job_two_processes_match_one(job_inputs):
    root = job_inputs["root"]
    single, shared = root / "single", root / "two_processes"
    port = free_loopback_port()
    loopback = {"JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}
    logs = [root / "process0.log", root / "process1.log"]
    processes = []
    for process_id, log in enumerate(logs):
        distributed = [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
        arguments = ["job", *job_flags(job_inputs, shared), *distributed]
        processes.append(start_worker(log, 2, arguments, loopback))
    wait_all(processes, logs)
    single_log = root / "single.log"
    wait_all([start_worker(single_log, 4, ["job", *job_flags(job_inputs, single)])], [single_log])

    np.testing.assert_allclose(
        np.load(shared / "final_soft_prompt.npy"),
        np.load(single / "final_soft_prompt.npy"),
        rtol=0,
        atol=PROMPT_ATOL,
    )
    single_rows = (single / "metrics.jsonl").read_text().splitlines()
    shared_rows = (shared / "metrics.jsonl").read_text().splitlines()
    assert len(shared_rows) == len(single_rows)
    for single_row, shared_row in zip(single_rows, shared_rows, strict=True):
        expected, actual = json.loads(single_row), json.loads(shared_row)
        assert actual["step"] == expected["step"]
        np.testing.assert_allclose(actual["loss/total"], expected["loss/total"], rtol=LOSS_RTOL)

    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in single.iterdir())
    process1 = logs[1].read_text()
    assert "Wrote the final soft prompt" in logs[0].read_text()
    assert "Wrote the final soft prompt" not in process1
    assert "metrics.py" not in process1
