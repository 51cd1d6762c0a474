"""SIGTERM and SIGKILL against real subprocesses that save checkpoints in a loop.

The subprocesses run tests/training/checkpoint_worker.py. The tests signal them by PID only.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcd_jax.method.schedule import SchedulePosition
from mcd_jax.training.checkpointing import CHECKPOINT_SUBDIR, TrainingCheckpoints, TrainState
from mcd_jax.training.preemption import PreemptionWatcher

WORKER = Path(__file__).with_name("checkpoint_worker.py")
# 8192 x 1024 float32 is 32 MiB, 96 MiB with AdamW's mu and nu. Saving that took about 0.25 s
# on a local disk (measured once), so the test can see orbax's temporary directory and kill then.
KILL_ROWS = 8192
TERM_ROWS = 4
TIMEOUT_S = 60


def start_worker(workdir: Path, mode: str, rows: int) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(workdir), mode, str(rows)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def template(rows: int) -> TrainState:
    soft_prompt = jnp.zeros((rows, 1024), jnp.float32)
    return TrainState(
        step=0,
        soft_prompt=soft_prompt,
        opt_state=optax.adamw(1e-3).init(soft_prompt),
        rng_key=jax.random.key(0),
        position=SchedulePosition(language="en", epoch=0, batch=0),
    )


def committed_steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def temporary_dirs(checkpoints: Path) -> list[str]:
    return [p.name for p in checkpoints.iterdir() if "tmp" in p.name]


def test_sigkill_mid_save_keeps_last_complete(tmp_path):
    checkpoints = tmp_path / CHECKPOINT_SUBDIR
    worker = start_worker(tmp_path, "sigkill", KILL_ROWS)
    try:
        # Wait for one committed step, then for the temporary directory of a later save.
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and worker.poll() is None:
            if (
                checkpoints.is_dir()
                and committed_steps(checkpoints)
                and temporary_dirs(checkpoints)
            ):
                break
            time.sleep(0.005)
        assert worker.poll() is None, worker.stderr.read()[-3000:]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=TIMEOUT_S)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=TIMEOUT_S)

    assert worker.returncode == -signal.SIGKILL
    leftovers = temporary_dirs(checkpoints)
    assert leftovers, "the worker finished its save before SIGKILL; the test proved nothing"
    last_complete = committed_steps(checkpoints)[-1]

    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=2) as ckpts:
        restored = ckpts.restore_latest(template(KILL_ROWS))
    assert restored is not None
    assert restored.step == last_complete
    assert np.all(np.asarray(restored.soft_prompt) == float(last_complete))
    assert temporary_dirs(checkpoints) == []


def test_sigterm_saves_and_exits_zero(tmp_path):
    worker = start_worker(tmp_path, "sigterm", TERM_ROWS)
    try:
        for line in worker.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= 3:
                os.kill(worker.pid, signal.SIGTERM)
                break
        stdout, stderr = worker.communicate(timeout=TIMEOUT_S)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=TIMEOUT_S)

    assert worker.returncode == 0, stderr[-3000:]
    stopped = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("stopped ")]
    assert len(stopped) == 1, stdout
    assert "Preemption (SIGTERM) noticed at step" in stderr

    with TrainingCheckpoints(tmp_path, save_every=1, max_to_keep=2) as ckpts:
        assert ckpts.all_steps() == stopped
        restored = ckpts.restore_latest(template(TERM_ROWS))
    assert restored is not None
    assert restored.step == stopped[0]
    assert np.all(np.asarray(restored.soft_prompt) == float(stopped[0]))


def test_watcher_records_signal_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as preemption:
        assert not preemption.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        # Python runs the handler in the main thread between bytecodes, so allow it a moment.
        for _ in range(100):
            if preemption.requested:
                break
            time.sleep(0.01)
        assert preemption.requested
        assert preemption.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is previous
