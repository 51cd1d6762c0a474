"""Orbax checkpoints of the training state, and the run fingerprint that guards resuming.

A run trains one soft prompt `[P, d]` with one optax optimizer, so a checkpoint is small: the soft
prompt, the optimizer state, the RNG key and the position in the language schedule. Each step
directory under `<workdir>/checkpoints/` contains two orbax items:

- `arrays` (`StandardSave`): `soft_prompt`, `opt_state` (any optax state pytree) and
  `rng_key_data` (the raw bits of the typed key, from `jax.random.key_data`).
- `progress` (`JsonSave`): `step`, the schedule position (`language`, null for schedules that
  mix languages in a batch, `epoch`, `batch`) and `rng_key_impl`.

Orbax writes each step into a temporary directory and renames it on commit, so a process killed
mid-save leaves a temporary directory that `CheckpointManager` ignores (and deletes on the next
start) rather than a step that looks complete. A step whose files were damaged afterwards fails
to restore, and `TrainingCheckpoints.restore_latest` falls back to the previous step.

The trainer's loop, in outline:

    fingerprint = RunFingerprint.from_config(config, model_hash=..., dataset=..., ...)
    check_fingerprint(workdir, fingerprint, force=config.checkpoint.force_resume)
    with PreemptionWatcher() as preemption, TrainingCheckpoints(workdir, ...) as checkpoints:
        state = checkpoints.resume_or_start(initial_state, resume=config.checkpoint.resume)
        while ...:
            state = train_step(state)
            checkpoints.save(state)  # saves only every `save_every` steps
            if preemption.should_stop(state.step):
                checkpoints.save(state, force=True, reason="preemption")
                return
        checkpoints.save(state, force=True, reason="final")
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy, save_decision_policy

from mcd_jax.files import write_atomically
from mcd_jax.method.schedule import SchedulePosition
from mcd_jax.training.config import TrainConfig

CHECKPOINT_SUBDIR = "checkpoints"
FINGERPRINT_FILE = "fingerprint.json"

_ARRAYS_ITEM = "arrays"
_PROGRESS_ITEM = "progress"

# Errors seen when restoring damaged checkpoints with orbax-checkpoint 0.12 and tensorstore:
# ValueError (tensorstore DATA_LOSS/NOT_FOUND/OUT_OF_RANGE, truncated JSON, tree mismatch),
# OSError (missing files) and KeyError (a missing item directory).
_DAMAGED_CHECKPOINT_ERRORS = (ValueError, OSError, KeyError)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint stores to continue a run bit for bit.

    Attributes:
        step: number of optimizer steps taken.
        soft_prompt: the trained soft prompt, `[P, d]` float32.
        opt_state: the optax optimizer state of the soft prompt.
        rng_key: a typed JAX key (from `jax.random.key`), not a raw uint32 key.
        position: the schedule position of the next batch (`ScheduleStep.position` of the
            step after this one).
    """

    step: int
    soft_prompt: jax.Array
    opt_state: optax.OptState
    rng_key: jax.Array
    position: SchedulePosition


@dataclasses.dataclass(frozen=True)
class RunFingerprint:
    """Settings that a checkpoint is valid for. Resuming under other settings is an error.

    Attributes:
        model: the model reference (hub id, local folder or packaged name).
        model_hash: a hash of the model weights or of their file listing.
        dataset: a fingerprint of the training and anchor data.
        objective: the objective's settings (loss weights, mode, ablation, consistency target).
        schedule: the schedule's settings (kind, languages, batch size, epochs, seed).
        soft_prompt_shape: `(P, d)`.
    """

    model: str
    model_hash: str
    dataset: str
    objective: Mapping[str, Any]
    schedule: Mapping[str, Any]
    soft_prompt_shape: tuple[int, int]

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        *,
        model_hash: str,
        dataset: str,
        soft_prompt_shape: tuple[int, int],
    ) -> RunFingerprint:
        """Collect the settings of `config` that change what a checkpoint contains.

        The objective part contains the method and estimation settings and the anchor languages.
        The schedule part contains the schedule and optimizer settings and the training languages.
        Settings that change neither the maths nor the batch order (--remat, mesh, logging,
        checkpointing) are left out, so a run may resume with other values for them.

        Args:
            config: the run's configuration.
            model_hash: a hash of the model weights or of their file listing.
            dataset: a fingerprint of the training and anchor data.
            soft_prompt_shape: `(P, d)`.

        Returns:
            The fingerprint.
        """
        schedule = dataclasses.asdict(config.schedule)
        del schedule["remat"]
        schedule["train_languages"] = list(config.data.train_languages)
        objective = {
            **dataclasses.asdict(config.method),
            "estimation": dataclasses.asdict(config.estimation),
            "anchor_languages": list(config.data.anchor_languages),
        }
        if config.data.anchors_per_label is not None:
            # Only when set, so that fingerprints written before the setting existed still match.
            objective["anchors_per_label"] = config.data.anchors_per_label
        model = config.model.ref
        if config.model.revision:
            model = f"{model}@{config.model.revision}"
        return cls(
            model=model,
            model_hash=model_hash,
            dataset=dataset,
            objective=objective,
            schedule=schedule,
            soft_prompt_shape=tuple(soft_prompt_shape),
        )

    def to_json(self) -> dict[str, Any]:
        """Return the fingerprint as a JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))


class FingerprintMismatchError(ValueError):
    """The work directory was made by a run with other settings."""


class NoRestorableCheckpointError(RuntimeError):
    """Every checkpoint in the work directory failed to restore."""


def _is_primary_process() -> bool:
    return jax.process_index() == 0


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def fingerprint_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """List the keys whose values differ, as `key: stored <a>, this run <b>` lines.

    Nested dicts are compared key by key, named with dots (`objective.weight_refusal`).

    Args:
        stored: the fingerprint read from the work directory.
        current: the fingerprint of this run.

    Returns:
        One line per differing key, sorted by key; empty when the fingerprints match.
    """
    stored_flat = _flatten(stored)
    current_flat = _flatten(current)
    lines = []
    for key in sorted(stored_flat.keys() | current_flat.keys()):
        old = stored_flat.get(key, "<absent>")
        new = current_flat.get(key, "<absent>")
        if old != new:
            lines.append(f"{key}: stored {old!r}, this run {new!r}")
    return lines


def _write_json_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    write_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def check_fingerprint(
    workdir: str | os.PathLike[str], fingerprint: RunFingerprint, *, force: bool = False
) -> None:
    """Compare this run's fingerprint with the work directory's, and store it on first use.

    Only process 0 writes the file; every process compares. With `force`, a mismatch is logged
    as a warning and the file is replaced by this run's fingerprint.

    Args:
        workdir: the run's work directory.
        fingerprint: this run's fingerprint.
        force: resume even if the stored fingerprint differs.

    Raises:
        FingerprintMismatchError: the stored fingerprint differs or is unreadable, and `force` is
            False.
    """
    path = Path(workdir) / FINGERPRINT_FILE
    current = fingerprint.to_json()

    problems: list[str] = []
    if path.exists():
        try:
            problems = fingerprint_differences(json.loads(path.read_text()), current)
        except (OSError, ValueError) as err:
            problems = [f"{path} is unreadable: {err}"]
    if problems and not force:
        raise FingerprintMismatchError(
            f"work directory {workdir} was made by a run with other settings:\n  "
            + "\n  ".join(problems)
            + "\nUse another --workdir, or pass --force_resume to resume from it anyway."
        )
    if problems:
        logging.warning(
            "Resuming %s despite a fingerprint mismatch (forced):\n  %s",
            workdir,
            "\n  ".join(problems),
        )

    if _is_primary_process() and (problems or not path.exists()):
        _write_json_atomically(path, current)
        logging.info("Wrote the run fingerprint to %s", path)


def _check_typed_key(rng_key: jax.Array) -> None:
    if not jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"rng_key has dtype {rng_key.dtype}, expected a typed key: create it with "
            "jax.random.key(seed), or wrap raw bits with jax.random.wrap_key_data"
        )


def _save_args(state: TrainState) -> ocp.args.Composite:
    arrays = {
        "soft_prompt": state.soft_prompt,
        "opt_state": state.opt_state,
        "rng_key_data": jax.random.key_data(state.rng_key),
    }
    progress = {
        "step": int(state.step),
        "language": state.position.language,
        "epoch": int(state.position.epoch),
        "batch": int(state.position.batch),
        "rng_key_impl": str(jax.random.key_impl(state.rng_key)),
    }
    return ocp.args.Composite(
        **{_ARRAYS_ITEM: ocp.args.StandardSave(arrays), _PROGRESS_ITEM: ocp.args.JsonSave(progress)}
    )


def _restore_args(template: TrainState) -> ocp.args.Composite:
    arrays = {
        "soft_prompt": template.soft_prompt,
        "opt_state": template.opt_state,
        "rng_key_data": jax.random.key_data(template.rng_key),
    }
    # Shape-dtype structs keep each jax.Array's sharding, so arrays come back sharded as in the
    # template.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, arrays)
    return ocp.args.Composite(
        **{_ARRAYS_ITEM: ocp.args.StandardRestore(abstract), _PROGRESS_ITEM: ocp.args.JsonRestore()}
    )


def _state_from_restored(step: int, restored: Any) -> TrainState:
    arrays = restored[_ARRAYS_ITEM]
    progress = restored[_PROGRESS_ITEM]
    if progress["step"] != step:
        raise ValueError(f"invalid progress metadata: it stores step {progress['step']}")
    rng_key = jax.random.wrap_key_data(arrays["rng_key_data"], impl=progress["rng_key_impl"])
    position = SchedulePosition(
        language=progress["language"], epoch=progress["epoch"], batch=progress["batch"]
    )
    return TrainState(
        step=step,
        soft_prompt=arrays["soft_prompt"],
        opt_state=arrays["opt_state"],
        rng_key=rng_key,
        position=position,
    )


class TrainingCheckpoints:
    """Saves and restores `TrainState`s under `<workdir>/checkpoints/` with an orbax manager.

    Use it as a context manager, or call `close()`, so that an asynchronous save finishes before
    the process exits.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int,
        async_save: bool = True,
    ) -> None:
        """Open (or create) the checkpoint directory of a run.

        Args:
            workdir: the run's work directory.
            save_every: interval between saves, in steps (for `save` without `force`).
            max_to_keep: number of most recent checkpoints to keep; older ones are deleted.
            async_save: write checkpoints in a background thread after copying arrays to host.

        Raises:
            ValueError: `save_every` or `max_to_keep` is below 1.
        """
        if save_every < 1:
            raise ValueError(f"invalid save_every={save_every}: it must be >= 1 (steps)")
        if max_to_keep < 1:
            raise ValueError(f"invalid max_to_keep={max_to_keep}: it must be >= 1")
        self.directory = Path(workdir).absolute() / CHECKPOINT_SUBDIR
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision_policy.FixedIntervalPolicy(save_every),
            preservation_policy=preservation_policy.LatestN(max_to_keep),
            # Deletes temporary directories of saves that a killed process left behind.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_ARRAYS_ITEM, _PROGRESS_ITEM)
        )

    def __enter__(self) -> TrainingCheckpoints:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Return the steps of the committed checkpoints, in increasing order."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Return the step of the newest committed checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def save(self, state: TrainState, *, force: bool = False, reason: str = "interval") -> bool:
        """Save `state` if its step is a multiple of `save_every`, or always with `force`.

        A step that already has a checkpoint is not saved again.

        Args:
            state: the state after `state.step` optimizer steps.
            force: save whatever the step (at the end of training, on preemption).
            reason: a word for the log line, e.g. "interval", "final", "preemption".

        Returns:
            Whether a save was started.

        Raises:
            TypeError: `state.rng_key` is not a typed key.
        """
        _check_typed_key(state.rng_key)
        if state.step in self._manager.all_steps():
            logging.info("Step %d already has a checkpoint in %s", state.step, self.directory)
            return False
        started = self._manager.save(state.step, args=_save_args(state), force=force)
        if started:
            logging.info(
                "Saving checkpoint of step %d (%s) to %s", state.step, reason, self.directory
            )
        return started

    def restore(self, step: int, template: TrainState) -> TrainState:
        """Restore the checkpoint of `step` into the structure, dtypes and shardings of `template`.

        Args:
            step: a step from `all_steps()`.
            template: a state of the same structure, e.g. the freshly initialised one; its
                values are not used.

        Returns:
            The restored state.

        Raises:
            ValueError, OSError, KeyError: the checkpoint is damaged or does not match
                `template`.
        """
        _check_typed_key(template.rng_key)
        restored = self._manager.restore(step, args=_restore_args(template))
        return _state_from_restored(step, restored)

    def restore_latest(self, template: TrainState) -> TrainState | None:
        """Restore the newest checkpoint that loads, falling back past damaged ones.

        Each checkpoint that fails to load is logged as a warning with its step and error. Once
        an older one loads, the damaged newer ones are deleted so that the run can save those
        steps again.

        Args:
            template: a state of the same structure as the saved ones (see `restore`).

        Returns:
            The restored state, or None when the directory has no checkpoint.

        Raises:
            NoRestorableCheckpointError: there are checkpoints but none of them loads.
        """
        failures: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, template)
            except _DAMAGED_CHECKPOINT_ERRORS as err:
                logging.warning(
                    "Checkpoint of step %d in %s failed to restore, trying the previous one: "
                    "%s: %s",
                    step,
                    self.directory,
                    type(err).__name__,
                    err,
                )
                failures.append((step, err))
                continue

            for damaged_step, _ in failures:
                logging.warning("Deleting the damaged checkpoint of step %d", damaged_step)
                self._manager.delete(damaged_step)
            logging.info("Restored the checkpoint of step %d from %s", step, self.directory)
            return state

        if failures:
            details = "\n  ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
            raise NoRestorableCheckpointError(
                f"no checkpoint in {self.directory} could be restored:\n  {details}\n"
                "If the model, data or soft prompt shape changed, start in a new --workdir."
            )
        return None

    def resume_or_start(self, initial_state: TrainState, *, resume: bool) -> TrainState:
        """Return the latest restorable state when resuming, else `initial_state`.

        Args:
            initial_state: the state to start from; also the template for restoring.
            resume: continue from the latest checkpoint if there is one.

        Returns:
            The state to train from.

        Raises:
            ValueError: `resume` is False but the directory already has checkpoints, which new
                saves would collide with.
            NoRestorableCheckpointError: see `restore_latest`.
        """
        if not resume:
            steps = self.all_steps()
            if steps:
                raise ValueError(
                    f"{self.directory} already has checkpoints at steps {steps} but resuming is "
                    "off (--resume=false); use a new --workdir or delete those checkpoints"
                )
            return initial_state

        restored = self.restore_latest(initial_state)
        if restored is None:
            logging.info(
                "No checkpoint in %s; starting from step %d", self.directory, initial_state.step
            )
            return initial_state
        return restored

    def wait_until_finished(self) -> None:
        """Block until the last asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the orbax manager."""
        self._manager.close()
