"""A training-loop stand-in that the checkpoint tests start as a subprocess and then signal.

Usage: python checkpoint_worker.py WORKDIR {sigkill,sigterm} ROWS

Step `s` has the soft prompt `full([ROWS, 1024], s)`, so the tests can tell which step a restored
checkpoint belongs to.
- sigkill: saves every step synchronously and forever, printing `saving <step>` before each save.
- sigterm: takes a step every 20 ms with a PreemptionWatcher installed, printing `step <step>`;
  on SIGTERM it saves, prints `stopped <step>` and exits 0.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import logging  # noqa: E402

from mcd_jax.method.schedule import SchedulePosition  # noqa: E402
from mcd_jax.training.checkpointing import TrainingCheckpoints, TrainState  # noqa: E402
from mcd_jax.training.preemption import PreemptionWatcher  # noqa: E402

WIDTH = 1024


def make_state(step: int, rows: int) -> TrainState:
    soft_prompt = jnp.full((rows, WIDTH), float(step), jnp.float32)
    return TrainState(
        step=step,
        soft_prompt=soft_prompt,
        opt_state=optax.adamw(1e-3).init(soft_prompt),
        rng_key=jax.random.key(step),
        position=SchedulePosition(language="en", epoch=0, batch=step),
    )


def run_until_killed(workdir: str, rows: int) -> None:
    with TrainingCheckpoints(workdir, save_every=1, max_to_keep=2, async_save=False) as ckpts:
        step = 1
        while True:
            state = make_state(step, rows)
            print(f"saving {step}", flush=True)
            ckpts.save(state)
            step += 1


def run_until_preempted(workdir: str, rows: int) -> None:
    with (
        PreemptionWatcher() as preemption,
        TrainingCheckpoints(workdir, save_every=10_000, max_to_keep=2) as ckpts,
    ):
        step = 0
        while True:
            step += 1
            time.sleep(0.02)
            print(f"step {step}", flush=True)
            if preemption.should_stop(step):
                ckpts.save(make_state(step, rows), force=True, reason="preemption")
                print(f"stopped {step}", flush=True)
                return


def main() -> None:
    workdir, mode, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logging.set_verbosity(logging.INFO)
    if mode == "sigkill":
        run_until_killed(workdir, rows)
    elif mode == "sigterm":
        run_until_preempted(workdir, rows)
    else:
        raise SystemExit(f"unknown mode {mode!r}: expected sigkill or sigterm")


if __name__ == "__main__":
    main()
