"""The training job end to end: launch/train.py stopped by SIGTERM or SIGKILL, then resumed.

Every run trains the tiny random model of `test_step_support` with configs/tiny_test.cfg on 16
pairs of the built-in training split (48 steps). The stopped, resumed and uninterrupted
runs are real subprocesses of launch/train.py on one CPU device, signalled by their PID. The
checks of bad settings run the job in this process, on its 8 host CPU devices.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from mcd_jax import flags as mcd_flags
from mcd_jax.models import load_model
from mcd_jax.states import compute_states
from mcd_jax.training import config as config_lib
from mcd_jax.training.checkpointing import CHECKPOINT_SUBDIR, FingerprintMismatchError
from mcd_jax.training.job import (
    FINAL_SOFT_PROMPT_FILE,
    FINAL_SUMMARY_FILE,
    JobConfigurationError,
    run_training_job,
)
from mcd_jax.training.metrics import METRICS_FILE

sys.path.insert(0, str(Path(__file__).parent))
from test_step_support import (  # noqa: E402
    TEXT_PROMPT,
    TINY_CONFIG,
    build_tiny_model_folder,
    write_estimation_artifacts,
    write_small_dataset,
)

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "train.py"
TOTAL_STEPS = 48
LOSS_NAMES = (
    "loss/total",
    "loss/refusal",
    "loss/harmfulness",
    "loss/complement",
    "loss/consistency",
    "grad_norm",
)


@pytest.fixture(scope="module")
def inputs(smollm2_tokenizer, tmp_path_factory):
    """The tiny model folder, a 16-pair dataset and estimation artifacts, as run flags."""
    root = tmp_path_factory.mktemp("tiny_job")
    folder = build_tiny_model_folder(smollm2_tokenizer, root / "model")
    dataset = write_small_dataset(root / "train.jsonl", 16, ("en", "da"))
    loaded = load_model(folder, dtype=jnp.float32)
    queries = [json.loads(line)["text"] for line in dataset.read_text().splitlines()]
    anchor_states = np.concatenate(
        [
            compute_states(loaded.model, loaded.tokenizer, queries),
            compute_states(loaded.model, loaded.tokenizer, queries, text_prompt=TEXT_PROMPT),
        ]
    )
    artifacts = write_estimation_artifacts(anchor_states, root / "estimation")
    return {
        "root": root,
        "flags": [
            f"--flagfile={TINY_CONFIG}",
            f"--model={folder}",
            f"--dataset={dataset}",
            f"--estimation_artifacts={artifacts}",
        ],
    }


def parse_config(argv: list[str]) -> config_lib.TrainConfig:
    flag_values = flags.FlagValues()
    mcd_flags.define_flags(flag_values)
    flag_values(["train.py", *argv])
    return mcd_flags.config_from_flags(flag_values)


def losses(workdir: Path) -> dict[int, tuple[float, ...]]:
    """Read each step's loss terms from metrics.jsonl, skipping a partly written last line."""
    path = workdir / METRICS_FILE
    rows = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows[row["step"]] = tuple(row[name] for name in LOSS_NAMES)
    return rows


def last_logged_step(workdir: Path) -> int:
    return max(losses(workdir), default=0)


def committed_steps(workdir: Path) -> list[int]:
    folder = workdir / CHECKPOINT_SUBDIR
    return sorted(int(path.name) for path in folder.iterdir() if path.name.isdigit())


def saves_in_progress(workdir: Path) -> list[str]:
    folder = workdir / CHECKPOINT_SUBDIR
    if not folder.is_dir():
        return []
    return [path.name for path in folder.iterdir() if "orbax-checkpoint-tmp" in path.name]


class Run:
    """A launch/train.py subprocess on one CPU device, its output going to a log file."""

    def __init__(self, inputs, workdir: Path, *extra: str) -> None:
        self.workdir = workdir
        self.log_path = workdir.parent / f"{workdir.name}.{time.time_ns()}.log"
        # One device compiles and loads faster than the eight of the test process.
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(LAUNCHER), *inputs["flags"], f"--workdir={workdir}", *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def finish(self, timeout: float = 400) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text()


def signal_when(runs: dict[str, tuple[Run, object, signal.Signals]], timeout: float = 400):
    """Send each run its signal once its condition holds, polling every 5 ms.

    Returns:
        Name -> the value of `last_logged_step` when the signal was sent.
    """
    pending = dict(runs)
    signalled = {}
    deadline = time.monotonic() + timeout
    while pending:
        for name, (run, condition, signum) in list(pending.items()):
            if condition(run.workdir):
                os.kill(run.process.pid, signum)
                signalled[name] = last_logged_step(run.workdir)
                del pending[name]
            else:
                assert run.process.poll() is None, f"{name} exited early:\n{run.log()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {sorted(pending)}"
        time.sleep(0.005)
    return signalled


@pytest.fixture(scope="module")
def runs(inputs):
    """Run the job uninterrupted, stopped by SIGTERM and SIGKILLed during a save, then resume.

    The three first runs go at the same time, then the two resumed runs.
    """
    root = inputs["root"]
    uninterrupted = Run(inputs, root / "uninterrupted")
    terminated = Run(inputs, root / "sigterm")
    killed = Run(inputs, root / "sigkill", "--save_every=1")
    signalled = signal_when(
        {
            "sigterm": (terminated, lambda w: last_logged_step(w) >= 2, signal.SIGTERM),
            "sigkill": (
                killed,
                lambda w: last_logged_step(w) >= 3 and saves_in_progress(w),
                signal.SIGKILL,
            ),
        }
    )
    first_exit = {"sigterm": terminated.finish(), "sigkill": killed.finish()}
    first_logs = {"sigterm": terminated.log(), "sigkill": killed.log()}
    stopped = {
        "sigterm": committed_steps(root / "sigterm"),
        "sigkill": last_logged_step(root / "sigkill"),
    }

    resumed = {
        "sigterm": Run(inputs, root / "sigterm"),
        "sigkill": Run(inputs, root / "sigkill", "--save_every=1"),
    }
    results = {
        "uninterrupted": uninterrupted.finish(),
        **{f"resumed_{name}": run.finish() for name, run in resumed.items()},
    }
    assert all(code == 0 for code in results.values()), (
        results,
        {name: run.log()[-3000:] for name, run in resumed.items()},
        uninterrupted.log()[-3000:],
    )
    return {
        "signalled": signalled,
        "first_exit": first_exit,
        "first_logs": first_logs,
        "stopped": stopped,
        "resumed_logs": {name: run.log() for name, run in resumed.items()},
        "reference_prompt": np.load(root / "uninterrupted" / FINAL_SOFT_PROMPT_FILE),
        "reference_losses": losses(root / "uninterrupted"),
    }


def test_sigterm_then_resume_is_bitwise_identical(inputs, runs):
    workdir = inputs["root"] / "sigterm"
    stopped_at = max(runs["stopped"]["sigterm"])

    assert runs["first_exit"]["sigterm"] == 0, runs["first_logs"]["sigterm"][-3000:]
    assert "Preemption (SIGTERM) noticed at step" in runs["first_logs"]["sigterm"]
    assert 2 <= stopped_at < TOTAL_STEPS
    assert f"Restored the checkpoint of step {stopped_at}" in runs["resumed_logs"]["sigterm"]
    np.testing.assert_array_equal(
        np.load(workdir / FINAL_SOFT_PROMPT_FILE), runs["reference_prompt"]
    )
    assert losses(workdir) == runs["reference_losses"]
    summary = json.loads((workdir / FINAL_SUMMARY_FILE).read_text())
    assert summary["steps"] == TOTAL_STEPS
    model_record = json.loads((workdir / "model.json").read_text())
    assert model_record["model_type"] == "qwen2"
    assert model_record["hidden_size"] == runs["reference_prompt"].shape[1]
    assert model_record["chat_template_sha256"]
    assert summary["shape"] == list(runs["reference_prompt"].shape)


def test_sigkill_during_save_then_resume(inputs, runs):
    workdir = inputs["root"] / "sigkill"
    last_step = runs["stopped"]["sigkill"]
    log = runs["resumed_logs"]["sigkill"]
    restored = [
        int(line.split("Restored the checkpoint of step ")[1].split()[0])
        for line in log.splitlines()
        if "Restored the checkpoint of step " in line
    ]

    assert runs["first_exit"]["sigkill"] == -signal.SIGKILL
    # At most one asynchronous save is in flight, and it starts only after the previous one
    # committed. When metrics row k is written, the save of step k - 1 may be in flight, so
    # step k - 2 is committed.
    assert len(restored) == 1, log[-3000:]
    assert restored[0] >= last_step - 2
    assert saves_in_progress(workdir) == []
    np.testing.assert_array_equal(
        np.load(workdir / FINAL_SOFT_PROMPT_FILE), runs["reference_prompt"]
    )
    assert losses(workdir) == runs["reference_losses"]


@pytest.fixture
def model_loading_fails(monkeypatch):
    """Make any model load fail the test, to show that an error came before it."""

    def fail(*args, **kwargs):
        raise AssertionError(f"the model was loaded with {args} {kwargs}")

    monkeypatch.setattr("mcd_jax.models.loading.load_model", fail)


def bad_settings(
    inputs, tmp_path: Path
) -> tuple[dict[str, tuple[dict, str]], config_lib.TrainConfig]:
    """Name -> (changed config sections, expected message) for settings that must fail."""
    config = parse_config([*inputs["flags"], f"--workdir={tmp_path / 'work'}"])
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("a file where the work directory should go")
    english_only = tmp_path / "english.jsonl"
    english_only.write_text(
        "".join(line + "\n" for line in Path(config.data.dataset).read_text().splitlines()
                if '"language": "en"' in line)
    )  # fmt: skip
    return {
        "mesh_not_dividing_devices": (
            {"mesh": config_lib.MeshConfig(data=3)},
            "does not divide the 8 devices",
        ),
        "batch_not_dividing_data_axes": (
            {"mesh": config_lib.MeshConfig(data=8, fsdp=1, tensor=1)},
            "do not divide the 4 queries",
        ),
        "accumulation_not_dividing_batch": (
            {"schedule": dataclasses.replace(config.schedule, grad_accum_steps=3)},
            "--grad_accum_steps=3 does not divide --batch_size=4",
        ),
        "unwritable_workdir": (
            {"checkpoint": dataclasses.replace(config.checkpoint, workdir=str(not_a_folder / "w"))},
            "is not writable",
        ),
        "missing_estimation_artifacts": (
            {"estimation": dataclasses.replace(config.estimation, artifacts=str(tmp_path))},
            "lacks",
        ),
        "data_not_parallel": (
            {"data": dataclasses.replace(config.data, dataset=str(english_only))},
            "no examples in language 'da'",
        ),
    }, config


@pytest.mark.parametrize(
    "case",
    [
        "mesh_not_dividing_devices",
        "batch_not_dividing_data_axes",
        "accumulation_not_dividing_batch",
        "unwritable_workdir",
        "missing_estimation_artifacts",
        "data_not_parallel",
    ],
)
def test_bad_setting_fails_before_loading(inputs, tmp_path, model_loading_fails, case):
    cases, config = bad_settings(inputs, tmp_path)
    changes, message = cases[case]

    with pytest.raises(JobConfigurationError, match=re.escape(message)):
        run_training_job(dataclasses.replace(config, **changes))


def test_bad_command_lines_fail_before_loading(inputs, tmp_path):
    command_lines = {
        "unknown flag": (["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
        "out of range": (["--batch_size=0"], "--batch_size=0"),
        "missing flagfile": ([f"--flagfile={tmp_path / 'absent.cfg'}"], "absent.cfg"),
        "mesh": (["--mesh_data=3"], "does not divide the 8 devices"),
    }
    running = {}
    for name, (extra, _) in command_lines.items():
        running[name] = subprocess.Popen(
            [
                sys.executable,
                str(LAUNCHER),
                *inputs["flags"],
                f"--workdir={tmp_path / name}",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ),
        )
    for name, process in running.items():
        output, _ = process.communicate(timeout=120)
        message = command_lines[name][1]
        assert process.returncode == 1, (name, output[-3000:])
        assert message in output, (name, output[-3000:])
        assert "Traceback" not in output, (name, output[-3000:])
        assert "Stage start: loading model" not in output, (name, output[-3000:])


def test_other_runs_workdir_left_unchanged(inputs, runs, tmp_path):
    workdir = tmp_path / "other_run"
    shutil.copytree(inputs["root"] / "uninterrupted", workdir)
    records = {name: (workdir / name).read_bytes() for name in ("config.json", "model.json")}
    files = sorted(p.name for p in workdir.rglob("*"))
    config = parse_config([*inputs["flags"], f"--workdir={workdir}", "--learning_rate=0.5"])

    with pytest.raises(FingerprintMismatchError, match="schedule.learning_rate"):
        run_training_job(config)

    for name, content in records.items():
        assert (workdir / name).read_bytes() == content, name
    assert sorted(p.name for p in workdir.rglob("*")) == files
