"""The training step: one AdamW update of the soft prompt, jitted with explicit shardings.

The step is a pure function of its inputs. The frozen model's state is an argument, never a
closed-over constant, so XLA keeps it as sharded device buffers instead of folding it into the
executable. The soft prompt `[P, d]` float32 and its optimizer state are replicated and donated.
Every batch array is sharded on its leading axis over ("data", "fsdp").

A batch is a dict of arrays. Model inputs have one row per (query, language) pair that the step
runs through the model. Rows are query-major: row `q * languages_per_query + l` is query q in
language l. Loss inputs have one row per loss row:

- `input_ids`, `attention_mask`, `position_ids`: `[rows, seq]`.
- `slot_positions`: `[rows, P]`, where the soft prompt goes in each row.
- `labels`: `[loss_rows]`, 0 = harmful, 1 = harmless.
- `refusal_logits`, `harmfulness_logits`: `[loss_rows]`, the cached f_r and f_h of the English
  text-prompt state (`TextPromptCache`).
- `complement`: `[loss_rows, d - m]`, the cached complement coordinates in the row's language.
- `consistency`: `[loss_rows, d]`, the cached L_m target, only with text-prompt targets in MCD.
- `central_index`: `[queries]` int32, the language position of the loss row within each query,
  only in the "central_language" layout.

The three layouts (`StepLayout`) are:

- "one_language": the collaborative schedule with text-prompt L_m targets; rows = loss rows =
  queries, all in the schedule's current (central) language.
- "central_language": the collaborative schedule with soft-prompt L_m targets. Each query runs
  in every training language, and the other languages' soft-prompt states form the L_m target
  of the central language's row, which alone enters the loss.
- "all_languages": the all-languages schedule; every row is a loss row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mcd_jax.method.objective import (
    BaseTargets,
    ObjectiveConfig,
    objective_from_targets,
    soft_prompt_consistency_targets,
)
from mcd_jax.method.probes import LinearProbe
from mcd_jax.method.transform import Transform
from mcd_jax.sharding import batch_sharding, parameter_shardings
from mcd_jax.soft_prompt import splice_soft_prompt
from mcd_jax.states import last_position_states

StepLayout = Literal["one_language", "central_language", "all_languages"]
LAYOUTS = ("one_language", "central_language", "all_languages")


@struct.dataclass
class MethodArrays:
    """The estimation's outputs that the objective reads, fixed during training.

    Attributes:
        transform: The fitted transform, with its `[d, d]` basis.
        refusal_probe: f_r, weight `[m]`.
        harmfulness_probe: f_h, weight `[m]`.
    """

    transform: Transform
    refusal_probe: LinearProbe
    harmfulness_probe: LinearProbe


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step; changing one compiles a new step.

    Attributes:
        objective: Loss weights and variant.
        layout: How the batch's rows map to loss rows; see the module docstring.
        languages_per_query: Rows per query in the model input: 1 in the "one_language" layout,
            the number of training languages in the other two.
        grad_accum_steps: Micro-batches per update. Their gradients are averaged, which equals
            the gradient of the whole batch because every loss term is a mean over rows.
    """

    objective: ObjectiveConfig
    layout: StepLayout = "one_language"
    languages_per_query: int = 1
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is invalid; use one of {LAYOUTS}")
        if self.layout == "one_language" and self.languages_per_query != 1:
            raise ValueError(
                f"the one_language layout has 1 row per query; got "
                f"languages_per_query={self.languages_per_query}"
            )
        if self.layout != "one_language" and self.languages_per_query < 2:
            raise ValueError(
                f"the {self.layout} layout needs languages_per_query >= 2; got "
                f"{self.languages_per_query}"
            )
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} is invalid; use >= 1")

    @property
    def soft_prompt_targets(self) -> bool:
        """Whether the L_m target comes from the batch's own soft-prompt states."""
        uses_consistency = self.objective.mode == "mcd"
        return uses_consistency and self.objective.consistency_target == "soft_prompt"


def make_optimizer(
    learning_rate: float = 1e-3, weight_decay: float = 0.01, grad_clip: float = 1.0
) -> optax.GradientTransformation:
    """Build AdamW (betas 0.9/0.999, eps 1e-8) after global-norm clipping, the MCD reference's.

    Args:
        learning_rate: AdamW step size.
        weight_decay: Decoupled weight decay, per unit of learning rate.
        grad_clip: Maximum global gradient norm; 0 disables clipping.

    Returns:
        The optimizer; initialise it on the soft prompt alone.
    """
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    return optax.chain(*parts)


def batch_loss(
    soft_prompt: jax.Array,
    model_state: nnx.State,
    method: MethodArrays,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    config: StepConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the objective of one (micro-)batch as a function of the soft prompt.

    Args:
        soft_prompt: `[P, d]` float32.
        model_state: The frozen model's parameters, from `nnx.split`.
        method: Transform and probes.
        batch: The arrays listed in the module docstring.
        graphdef: The model's graph definition, from `nnx.split`.
        config: Static step settings.

    Returns:
        `(total, terms)` as `objective_from_targets` returns them.
    """
    model = nnx.merge(graphdef, model_state)
    embeds = model.embed(batch["input_ids"])
    embeds = splice_soft_prompt(embeds, soft_prompt, batch["slot_positions"])
    # The LM head is never applied: the objective reads final-norm states only.
    states = last_position_states(model, embeds, batch["attention_mask"], batch["position_ids"])

    loss_states, consistency = _loss_rows(states, batch, method.transform, config)
    targets = BaseTargets(
        refusal_logits=batch["refusal_logits"],
        harmfulness_logits=batch["harmfulness_logits"],
        complement=batch["complement"],
        consistency=consistency,
    )
    return objective_from_targets(
        loss_states,
        targets,
        batch["labels"],
        method.transform,
        method.refusal_probe,
        method.harmfulness_probe,
        config.objective,
    )


def _loss_rows(
    states: jax.Array, batch: Mapping[str, jax.Array], transform: Transform, config: StepConfig
) -> tuple[jax.Array, jax.Array | None]:
    """Select the loss rows `[loss_rows, d]` and their L_m targets from the model rows."""
    cached = batch.get("consistency")
    if config.layout == "one_language":
        return states, cached

    languages = config.languages_per_query
    d = states.shape[-1]
    grouped = states.reshape(-1, languages, d)
    soft_targets = None
    if config.soft_prompt_targets:
        by_language = jnp.swapaxes(grouped, 0, 1)
        soft_targets = jnp.swapaxes(soft_prompt_consistency_targets(by_language, transform), 0, 1)

    if config.layout == "all_languages":
        consistency = cached if soft_targets is None else soft_targets.reshape(-1, d)
        return states, consistency

    central = batch["central_index"][:, None, None]
    central_states = jnp.take_along_axis(grouped, central, axis=1)[:, 0]
    if soft_targets is None:
        return central_states, cached
    return central_states, jnp.take_along_axis(soft_targets, central, axis=1)[:, 0]


def _split_micro_batches(value: jax.Array, num_micro: int, num_queries: int) -> jax.Array:
    """Reshape `[queries * k, ...]` to `[num_micro, queries / num_micro * k, ...]`.

    Query q goes to micro-batch q % num_micro, so each micro-batch keeps the leading-axis
    sharding of the whole batch and the split needs no data movement between devices.
    """
    per_query = value.shape[0] // num_queries
    rest = value.shape[1:]
    value = value.reshape(num_queries // num_micro, num_micro, per_query, *rest)
    value = jnp.moveaxis(value, 1, 0)
    return value.reshape(num_micro, (num_queries // num_micro) * per_query, *rest)


def _gradients(
    soft_prompt: jax.Array,
    model_state: nnx.State,
    method: MethodArrays,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    config: StepConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Return the gradient `[P, d]` and the loss terms, averaged over micro-batches."""
    loss_and_grad = jax.value_and_grad(batch_loss, has_aux=True)

    def micro_step(micro_batch):
        (_, terms), grads = loss_and_grad(
            soft_prompt, model_state, method, micro_batch, graphdef=graphdef, config=config
        )
        return grads, terms

    num_micro = config.grad_accum_steps
    if num_micro == 1:
        return micro_step(batch)

    num_queries = batch["input_ids"].shape[0] // config.languages_per_query
    micro_batches = {
        name: _split_micro_batches(value, num_micro, num_queries) for name, value in batch.items()
    }

    def accumulate(grad_sum, micro_batch):
        grads, terms = micro_step(micro_batch)
        return grad_sum + grads, terms

    grad_sum, terms = jax.lax.scan(accumulate, jnp.zeros_like(soft_prompt), micro_batches)
    mean_terms = {name: jnp.mean(values) for name, values in terms.items()}
    return grad_sum / num_micro, mean_terms


def train_step(
    soft_prompt: jax.Array,
    opt_state: optax.OptState,
    model_state: nnx.State,
    method: MethodArrays,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    config: StepConfig,
) -> tuple[jax.Array, optax.OptState, dict[str, jax.Array]]:
    """Take one optimizer step on the soft prompt; the unjitted body of `TrainStep`.

    Args:
        soft_prompt: `[P, d]` float32.
        opt_state: The optimizer state of the soft prompt.
        model_state: The frozen model's parameters.
        method: Transform and probes.
        batch: The arrays listed in the module docstring.
        graphdef: The model's graph definition.
        optimizer: From `make_optimizer`.
        config: Static step settings.

    Returns:
        `(soft_prompt, opt_state, metrics)`: the updated prompt `[P, d]` and optimizer state,
        and every loss term (before weighting, plus "total") and "grad_norm" (before
        clipping) as scalars.
    """
    grads, terms = _gradients(
        soft_prompt, model_state, method, batch, graphdef=graphdef, config=config
    )
    updates, opt_state = optimizer.update(grads, opt_state, soft_prompt)
    soft_prompt = optax.apply_updates(soft_prompt, updates)
    return soft_prompt, opt_state, {**terms, "grad_norm": optax.global_norm(grads)}


class TrainStep:
    """`train_step` jitted once per batch structure, with explicit in and out shardings.

    Without a mesh the step runs on the default device. With a mesh the frozen parameters keep
    the shardings of `mcd_jax.sharding.parameter_shardings`, batch arrays are sharded on their
    leading axis over ("data", "fsdp"), and everything else is replicated.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_state: nnx.State,
        optimizer: optax.GradientTransformation,
        config: StepConfig,
        mesh: Mesh | None = None,
    ) -> None:
        """Prepare the step for one model, optimizer, configuration and mesh.

        Args:
            graphdef: The model's graph definition, from `nnx.split`.
            model_state: The frozen parameters (only their structure and shardings are read).
            optimizer: From `make_optimizer`.
            config: Static step settings.
            mesh: A ("data", "fsdp", "tensor") mesh, or None for one device.
        """
        self.config = config
        self.mesh = mesh
        self._body = functools.partial(
            train_step, graphdef=graphdef, optimizer=optimizer, config=config
        )
        self._model_shardings = None if mesh is None else parameter_shardings(model_state, mesh)
        self._compiled: dict[tuple, Callable] = {}

    def _jitted(self, batch: Mapping[str, jax.Array]):
        structure = tuple(sorted((name, value.ndim) for name, value in batch.items()))
        if structure in self._compiled:
            return self._compiled[structure]

        step = self._body
        if self.mesh is None:
            jitted = jax.jit(step, donate_argnums=(0, 1))
        else:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            batch_shardings = {name: batch_sharding(self.mesh, ndim) for name, ndim in structure}
            jitted = jax.jit(
                step,
                in_shardings=(
                    replicated,
                    replicated,
                    self._model_shardings,
                    replicated,
                    batch_shardings,
                ),
                out_shardings=(replicated, replicated, replicated),
                donate_argnums=(0, 1),
            )
        self._compiled[structure] = jitted
        return jitted

    def __call__(
        self,
        soft_prompt: jax.Array,
        opt_state: optax.OptState,
        model_state: nnx.State,
        method: MethodArrays,
        batch: Mapping[str, jax.Array],
    ) -> tuple[jax.Array, optax.OptState, dict[str, jax.Array]]:
        """Run one step; `soft_prompt` and `opt_state` are donated, so do not reuse them.

        Args and returns are those of `train_step`.
        """
        return self._jitted(batch)(soft_prompt, opt_state, model_state, method, dict(batch))
