"""Per-step training metrics: a JSONL file, TensorBoard event files, log lines, a progress bar.

Only process 0 writes, so a pod job produces one set of files in the work directory:

- `<workdir>/metrics.jsonl`: one JSON object per `MetricsWriter.write` call, with `step`,
  `time` (Unix seconds), `language` when given, and the scalars. Non-finite values are written
  as `null` because JSON has no NaN or infinity.
- `<workdir>/tensorboard/`: tensorboardX event files, one scalar series per name.
- An absl INFO line every `log_every` steps, and a progress bar when stderr is a terminal.

Scalar names use `/` to group TensorBoard charts, e.g. `loss/total`, `loss/refusal/ko`,
`throughput/examples_per_s`, `throughput/tokens_per_s`, `learning_rate`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"


class _ProgressBar(Protocol):
    def update(self, n: int) -> Any: ...

    def close(self) -> Any: ...


class _SimpleProgressBar:
    """A one-line text progress bar on stderr, used when tqdm is not installed."""

    def __init__(self, total: int | None, initial: int, stream: IO[str]) -> None:
        self._total = total
        self._count = initial
        self._stream = stream

    def update(self, n: int) -> None:
        self._count += n
        if self._total:
            filled = int(30 * min(self._count, self._total) / self._total)
            bar = "#" * filled + "." * (30 - filled)
            self._stream.write(f"\r[{bar}] {self._count}/{self._total} steps")
        else:
            self._stream.write(f"\r{self._count} steps")
        self._stream.flush()

    def close(self) -> None:
        self._stream.write("\n")
        self._stream.flush()


def _make_progress_bar(total: int | None, initial: int) -> _ProgressBar:
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleProgressBar(total, initial, sys.stderr)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"invalid metric {name!r}: value {value!r} of type {type(value).__name__} is not a "
            "scalar. Pass a Python number or a 0-d array."
        ) from err


def _format_summary(
    step: int, total_steps: int | None, language: str | None, scalars: Mapping[str, float]
) -> str:
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    if language:
        parts.append(f"[{language}]")
    parts.extend(f"{name}={value:.4g}" for name, value in scalars.items())
    return " ".join(parts)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop rows after `last_step`, which a run that is resumed from `last_step` writes again."""
    kept_lines = []
    with path.open() as f:
        for line_number, line in enumerate(f, start=1):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError) as err:
                # A process killed in the middle of a write leaves a partial last line.
                logging.warning("Dropping invalid line %d of %s: %s", line_number, path, err)
                continue
            if step <= last_step:
                kept_lines.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept_lines))
    os.replace(tmp, path)


class MetricsWriter:
    """Writes each step's scalars to JSONL and TensorBoard, and logs a summary line.

    On processes other than 0 every method does nothing. Use it as a context manager, or call
    `close()`, so that the TensorBoard events are flushed.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        log_every: int = 10,
        tensorboard: bool = True,
        total_steps: int | None = None,
        start_step: int = 0,
        progress_bar: bool = True,
        is_primary: bool | None = None,
    ) -> None:
        """Open the metric files of a run.

        Args:
            workdir: the run's work directory.
            log_every: log a summary line every this many steps.
            tensorboard: also write TensorBoard event files.
            total_steps: the number of steps of the whole run, for the log and progress bar.
            start_step: the step the run starts or resumes from. JSONL rows and TensorBoard
                events after it, left by an earlier run, are dropped because this run writes
                those steps again.
            progress_bar: show a progress bar; it is shown only when stderr is a terminal.
            is_primary: whether this process writes; defaults to `jax.process_index() == 0`.

        Raises:
            ValueError: `log_every` is below 1 or `start_step` is negative.
        """
        if log_every < 1:
            raise ValueError(f"invalid log_every={log_every}: it must be >= 1 (steps)")
        if start_step < 0:
            raise ValueError(f"invalid start_step={start_step}: it must be >= 0")
        self._log_every = log_every
        self._total_steps = total_steps
        self._primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._jsonl: IO[str]
        self._tensorboard: Any = None
        self._progress: _ProgressBar | None = None
        self._last_step = start_step
        if not self._primary:
            return

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = workdir / METRICS_FILE
        if self.jsonl_path.exists():
            _truncate_jsonl(self.jsonl_path, start_step)
        self._jsonl = self.jsonl_path.open("a")

        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tensorboard_dir = workdir / TENSORBOARD_SUBDIR
            # purge_step makes TensorBoard hide events at or after it from earlier event files.
            # tensorboardX 2.6 names event files by the second and host, and opens them with
            # mode "wb". The suffix keeps a writer from truncating one made in the same second.
            self._tensorboard = SummaryWriter(
                logdir=str(self.tensorboard_dir),
                purge_step=start_step + 1 if start_step else None,
                filename_suffix=f".{os.getpid()}.{time.time_ns()}",
            )

        if progress_bar and sys.stderr.isatty():
            self._progress = _make_progress_bar(total_steps, start_step)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, step: int, scalars: Mapping[str, Any], *, language: str | None = None) -> None:
        """Record the scalars of `step`.

        Args:
            step: the number of optimizer steps taken, from 1.
            scalars: metric name to value (Python numbers or 0-d arrays).
            language: the language of the step's batch, if it has a single one.

        Raises:
            TypeError: a value is not a scalar.
        """
        if not self._primary:
            return
        values = {name: _to_float(name, value) for name, value in scalars.items()}

        row: dict[str, Any] = {"step": step, "time": time.time()}
        if language is not None:
            row["language"] = language
        row.update({name: v if math.isfinite(v) else None for name, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, global_step=step)

        if step % self._log_every == 0 or step == self._total_steps:
            logging.info("%s", _format_summary(step, self._total_steps, language, values))
        if self._progress is not None:
            self._progress.update(step - self._last_step)
        self._last_step = step

    def close(self) -> None:
        """Flush and close the files and the progress bar."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._primary and not self._jsonl.closed:
            self._jsonl.close()


class ThroughputMeter:
    """Measures examples and tokens per second of wall time between calls."""

    def __init__(self) -> None:
        """Start the clock."""
        self._last = time.perf_counter()

    def measure(self, num_examples: int, num_tokens: int) -> dict[str, float]:
        """Return the throughput since the previous call (or since construction).

        Call it after the step's outputs are ready (e.g. after `jax.block_until_ready`), or the
        time covers only the dispatch of the asynchronous computation.

        Args:
            num_examples: examples processed since the previous call.
            num_tokens: input tokens processed since the previous call.

        Returns:
            `throughput/examples_per_s` and `throughput/tokens_per_s`.
        """
        now = time.perf_counter()
        elapsed = max(now - self._last, 1e-9)
        self._last = now
        return {
            "throughput/examples_per_s": num_examples / elapsed,
            "throughput/tokens_per_s": num_tokens / elapsed,
        }
