"""The training loop: schedule, batches, jitted step, checkpoints, preemption and metrics.

`train` runs one soft-prompt training run in a work directory and resumes from its latest
checkpoint by default. Everything a step needs but never changes is prepared before the loop:
the text-prompt states of every training query in every training language (cached in the work
directory) and the objective's cached targets (`precompute_text_prompt_cache`). A resumed run
restores the soft prompt, the optimizer state, the RNG key and the schedule position, so on CPU
it continues bit for bit as if it had not stopped.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mcd_jax.method.objective import precompute_text_prompt_cache
from mcd_jax.method.schedule import collaborative_schedule, parallel_schedule
from mcd_jax.models.loading import LoadedModel
from mcd_jax.prompts import resolve_text_prompt
from mcd_jax.sharding import replicated_key, to_host
from mcd_jax.soft_prompt import init_soft_prompt, text_prompt_token_ids
from mcd_jax.training.checkpointing import (
    RunFingerprint,
    TrainingCheckpoints,
    TrainState,
    check_fingerprint,
)
from mcd_jax.training.config import TrainConfig
from mcd_jax.training.data import (
    BatchBuilder,
    HostCache,
    ParallelTrainingSet,
    text_prompt_states,
)
from mcd_jax.training.metrics import MetricsWriter, ThroughputMeter
from mcd_jax.training.preemption import PreemptionWatcher
from mcd_jax.training.step import MethodArrays, StepConfig, TrainStep, make_optimizer


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`.

    Attributes:
        soft_prompt: The soft prompt after the last step taken, `[P, d]` float32.
        step: Steps taken in total, including those of earlier runs in the work directory.
        total_steps: Steps of the whole schedule.
        preempted: Whether the run stopped early on SIGTERM (after saving a checkpoint).
        last_metrics: The last step's metrics, or empty when no step ran in this call.
    """

    soft_prompt: np.ndarray
    step: int
    total_steps: int
    preempted: bool
    last_metrics: dict[str, float]

    @property
    def finished(self) -> bool:
        """Whether the whole schedule has run."""
        return self.step >= self.total_steps


def build_schedule(config: TrainConfig, num_examples: int):
    """Build the run's schedule from the config (DRO is the collaborative one on English).

    Each epoch's last batch is dropped when the batch size does not divide the examples, so
    every step has one shape, which the sharded step needs.

    Args:
        config: The run's configuration.
        num_examples: Queries per training language.

    Returns:
        A `CollaborativeSchedule` or `ParallelSchedule`.
    """
    settings = config.schedule
    if num_examples % settings.batch_size:
        logging.warning(
            "--batch_size=%d does not divide the %d training queries; each epoch skips the "
            "last %d queries of its shuffled order",
            settings.batch_size,
            num_examples,
            num_examples % settings.batch_size,
        )
    build = parallel_schedule if settings.schedule == "all_languages" else collaborative_schedule
    return build(
        num_examples,
        config.data.train_languages,
        settings.batch_size,
        settings.epochs_per_language,
        settings.seed,
        drop_last=True,
    )


def step_config(config: TrainConfig) -> StepConfig:
    """Choose the step layout for the schedule and consistency target of `config`."""
    objective = config.method.objective_config()
    num_languages = len(config.data.train_languages)
    if config.schedule.schedule == "all_languages":
        layout, per_query = "all_languages", num_languages
    elif objective.mode == "mcd" and objective.consistency_target == "soft_prompt":
        layout, per_query = "central_language", num_languages
    else:
        layout, per_query = "one_language", 1
    return StepConfig(
        objective=objective,
        layout=layout,
        languages_per_query=per_query,
        grad_accum_steps=config.schedule.grad_accum_steps,
    )


def initial_soft_prompt(loaded: LoadedModel, config: TrainConfig) -> jax.Array:
    """Initialise the soft prompt `[P, d]` from the embeddings of the text prompt's tokens."""
    text = resolve_text_prompt(config.method.soft_prompt_init_text or config.method.text_prompt)
    token_ids = text_prompt_token_ids(loaded.tokenizer, text, config.method.placement)
    # Only the prompt's rows are gathered to the host, not the whole (possibly sharded) table.
    rows = jnp.take(loaded.model.embed_tokens[...], jnp.asarray(token_ids), axis=0)
    table = to_host(rows.astype(jnp.float32))
    return init_soft_prompt(table, list(range(len(token_ids))))


def run_fingerprint(
    loaded: LoadedModel, config: TrainConfig, training_set: Any, model_id: str
) -> RunFingerprint:
    """Return the fingerprint that a work directory must match for this run to resume in it."""
    return RunFingerprint.from_config(
        config,
        model_hash=model_id,
        dataset=training_set.fingerprint(),
        soft_prompt_shape=tuple(initial_soft_prompt(loaded, config).shape),
    )


def _replicate(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _prepare_method_targets(
    loaded: LoadedModel,
    config: TrainConfig,
    method: MethodArrays,
    training_set: ParallelTrainingSet,
    model_id: str,
    mesh: Mesh | None,
) -> HostCache:
    """Compute (or reuse) the text-prompt states and turn them into the cached targets."""
    started = time.perf_counter()
    logging.info("Stage start: text-prompt states and cached targets")
    states = text_prompt_states(
        loaded.model,
        loaded.tokenizer,
        training_set,
        resolve_text_prompt(config.method.text_prompt),
        config.checkpoint.workdir,
        model_id=model_id,
        mesh=mesh,
    )
    cache = precompute_text_prompt_cache(
        jnp.asarray(states),
        training_set.languages,
        method.transform,
        method.refusal_probe,
        method.harmfulness_probe,
    )
    logging.info(
        "Stage end: text-prompt states %s and cached targets in %.1f s",
        states.shape,
        time.perf_counter() - started,
    )
    return HostCache.from_cache(cache)


def train(
    loaded: LoadedModel,
    config: TrainConfig,
    method: MethodArrays,
    training_set: ParallelTrainingSet,
    *,
    model_id: str,
    mesh: Mesh | None = None,
) -> TrainResult:
    """Train the soft prompt, resuming from the work directory's latest checkpoint if allowed.

    Args:
        loaded: The frozen model and its tokenizer, placed on `mesh`.
        config: The run's configuration; `config.checkpoint.workdir` must exist.
        method: The estimation's transform and probes.
        training_set: The parallel training set over `config.data.train_languages`.
        model_id: A string that identifies the weights, for the run fingerprint and caches.
        mesh: The device mesh, or None for one device.

    Returns:
        The final (or, after SIGTERM, the last saved) soft prompt and the run's progress.

    Raises:
        FingerprintMismatchError: The work directory belongs to a run with other settings.
        ValueError: The data, mesh and batch size do not fit together.
    """
    workdir = config.checkpoint.workdir
    schedule = build_schedule(config, training_set.num_examples)
    settings = step_config(config)
    soft_prompt = initial_soft_prompt(loaded, config)
    logging.info(
        "Training a soft prompt %s for %d steps (%s schedule, %s layout)",
        soft_prompt.shape,
        schedule.num_steps,
        config.schedule.schedule,
        settings.layout,
    )

    fingerprint = RunFingerprint.from_config(
        config,
        model_hash=model_id,
        dataset=training_set.fingerprint(),
        soft_prompt_shape=tuple(soft_prompt.shape),
    )
    # run_training_job has checked this already; a direct call of train() has not.
    check_fingerprint(workdir, fingerprint, force=config.checkpoint.force_resume)

    cache = _prepare_method_targets(loaded, config, method, training_set, model_id, mesh)
    batches = BatchBuilder(
        loaded.tokenizer,
        training_set,
        cache,
        layout=settings.layout,
        soft_prompt_length=soft_prompt.shape[0],
        include_consistency=not settings.soft_prompt_targets,
        placement=config.method.placement,
        max_length=loaded.config.max_position_embeddings,
        mesh=mesh,
    )

    loaded.model.remat = config.schedule.remat
    graphdef, model_state = nnx.split(loaded.model)
    optimizer = make_optimizer(
        config.schedule.learning_rate, config.schedule.weight_decay, config.schedule.grad_clip
    )
    step_fn = TrainStep(graphdef, model_state, optimizer, settings, mesh)

    soft_prompt = _replicate(soft_prompt, mesh)
    initial = TrainState(
        step=0,
        soft_prompt=soft_prompt,
        opt_state=_replicate(optimizer.init(soft_prompt), mesh),
        # NOTE: the step draws no random numbers yet. The key is saved and restored anyway,
        # so a stochastic step (e.g. dropout on the prompt) would resume bit for bit.
        rng_key=replicated_key(config.schedule.seed, mesh),
        position=schedule.position_of(0),
    )
    loop = _Loop(config, schedule, batches, step_fn, model_state, _replicate(method, mesh))
    return loop.run(initial)


class _Loop:
    """The step loop with its checkpoints, metrics and preemption handling."""

    def __init__(self, config, schedule, batches, step_fn, model_state, method) -> None:
        self.config = config
        self.schedule = schedule
        self.batches = batches
        self.step_fn = step_fn
        self.model_state = model_state
        self.method = method

    def run(self, initial: TrainState) -> TrainResult:
        settings = self.config.checkpoint
        with (
            PreemptionWatcher() as preemption,
            TrainingCheckpoints(
                settings.workdir,
                save_every=settings.save_every,
                max_to_keep=settings.keep_checkpoints,
            ) as checkpoints,
        ):
            state = checkpoints.resume_or_start(initial, resume=settings.resume)
            self._check_position(state)
            with MetricsWriter(
                settings.workdir,
                log_every=self.config.logging.log_every,
                tensorboard=self.config.logging.tensorboard,
                total_steps=self.schedule.num_steps,
                start_step=state.step,
            ) as metrics:
                state, last, preempted = self._steps(state, checkpoints, metrics, preemption)
            if not preempted:
                checkpoints.save(_snapshot(state), force=True, reason="final")
        return TrainResult(
            soft_prompt=np.asarray(state.soft_prompt),
            step=state.step,
            total_steps=self.schedule.num_steps,
            preempted=preempted,
            last_metrics=last,
        )

    def _check_position(self, state: TrainState) -> None:
        expected = self.schedule.position_of(state.step)
        if tuple(state.position) != tuple(expected):
            raise ValueError(
                f"the checkpoint of step {state.step} stores schedule position "
                f"{tuple(state.position)}, but this run's schedule is at {tuple(expected)} "
                "there; the schedule settings changed, so use a new --workdir"
            )

    def _steps(self, state, checkpoints, metrics, preemption):
        started = time.perf_counter()
        logging.info("Stage start: training from step %d", state.step)
        meter = ThroughputMeter()
        last: dict[str, float] = {}
        learning_rate = self.config.schedule.learning_rate
        for step in self.schedule.steps(state.position):
            batch = self.batches.device_batch(step)
            tokens = jnp.sum(batch["attention_mask"])
            soft_prompt, opt_state, terms = self.step_fn(
                state.soft_prompt, state.opt_state, self.model_state, self.method, batch
            )
            last = {name: float(value) for name, value in terms.items()}
            state = TrainState(
                step=step.step + 1,
                soft_prompt=soft_prompt,
                opt_state=opt_state,
                rng_key=state.rng_key,
                position=self.schedule.position_of(step.step + 1),
            )
            scalars = {
                **{f"loss/{name}": value for name, value in last.items() if name != "grad_norm"},
                "grad_norm": last["grad_norm"],
                "learning_rate": learning_rate,
                **meter.measure(batch["input_ids"].shape[0], int(tokens)),
            }
            metrics.write(state.step, scalars, language=step.language)

            if state.step % self.config.checkpoint.save_every == 0:
                checkpoints.save(_snapshot(state))
            if preemption.should_stop(state.step):
                checkpoints.save(_snapshot(state), force=True, reason="preemption")
                return state, last, True
        logging.info(
            "Stage end: training at step %d after %.1f s", state.step, time.perf_counter() - started
        )
        return state, last, False


def _snapshot(state: TrainState) -> TrainState:
    """Copy the arrays of `state`, so that the next step may donate the originals.

    The checkpoint manager may still read the arrays in the background when the next step
    donates the soft prompt and optimizer state buffers.
    """
    return dataclasses.replace(
        state,
        soft_prompt=jnp.copy(state.soft_prompt),
        opt_state=jax.tree.map(jnp.copy, state.opt_state),
    )
