"""Preemption: notice SIGTERM and let the training loop save and stop at a step boundary.

Schedulers (Kubernetes, SLURM, Cloud TPU maintenance) send SIGTERM some seconds before they kill a
job. The handler here only sets a flag. The loop polls `PreemptionWatcher.should_stop` once per
step, then saves a checkpoint and returns, so a save never starts inside a signal handler.

With several JAX processes the processes must save at the same step, and a SIGTERM may reach
them at different steps. There JAX's preemption sync manager (started by
`jax.distributed.initialize`) installs its own SIGTERM notifier and agrees on a step, so this
module installs no handler and asks `multihost_utils.reached_preemption_sync_point` instead.
"""

from __future__ import annotations

import signal
import threading
import types
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

_SignalHandler = Callable[[int, types.FrameType | None], Any] | int | None


class PreemptionWatcher:
    """Signal watcher that records SIGTERM and reports when the loop should save and stop.

    Use it as a context manager; leaving it restores the previous SIGTERM handler. It must be
    entered from the main thread, because Python installs signal handlers only there.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        """Prepare a watcher for `signals` (SIGTERM by default)."""
        self._signals = signals
        self._received = threading.Event()
        self._received_signal: int | None = None
        self._previous_handlers: dict[signal.Signals, _SignalHandler] = {}
        self._multi_process = False

    def __enter__(self) -> PreemptionWatcher:
        self._multi_process = jax.process_count() > 1
        if self._multi_process:
            logging.info(
                "Preemption: %d processes, using JAX's preemption sync point", jax.process_count()
            )
            return self
        for sig in self._signals:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        self._received_signal = signum
        self._received.set()

    @property
    def requested(self) -> bool:
        """Whether a watched signal arrived in this process."""
        return self._received.is_set()

    def should_stop(self, step: int) -> bool:
        """Return whether the loop should save and stop after `step`.

        Call it after every step: with several processes, JAX's sync point requires a call at
        every step from every process, and returns True on all of them at the same step.

        Args:
            step: the number of optimizer steps taken so far.

        Returns:
            True once preemption was requested (single process) or the processes reached the
            agreed preemption step (several processes).
        """
        if self._multi_process:
            # NOTE: no test covers this branch, because the tests run a single JAX process.
            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self.requested
        if stop:
            if self._received_signal is None:
                source = "JAX preemption sync point"
            else:
                source = signal.Signals(self._received_signal).name
            logging.warning(
                "Preemption (%s) noticed at step %d: saving a checkpoint and stopping", source, step
            )
        return stop
