"""The DRO and MCD training objective, as pure functions of arrays.

Labels are 0 = harmful and 1 = harmless. For soft-prompt states xθ and text-prompt states
x0 of the same parallel queries, the objective has four terms, each averaged over the batch:

- L_r = BCE(f_r(T(xθ)[:m]) - f_r(T(x0_en)[:m]), label), with the refusal probe f_r and the
  English text-prompt state whatever the batch's language.
- L_h, the same with the harmfulness probe f_h.
- L_U = mean over the d - m complement coordinates of (T(xθ)[m:] - T(x0_lang)[m:])^2, with
  the text-prompt state in the batch's own language.
- L_m (MCD only) = mean over all d coordinates of (T(xθ_lang) - target)^2. By default the
  target is the mean text-prompt state of the same query in the other training languages,
  as in the authors' code. With `consistency_target="soft_prompt"` it is the mean of the
  other languages' soft-prompt states, the formula as written in the MCD paper (Li et al.,
  "Multilingual Collaborative Defense for Large Language Models", arXiv 2505.11835).

DRO (Zheng et al., ICML 2024) is the same objective without L_m, trained on English only.
Everything that depends only on text-prompt states is computed once per run by
`precompute_text_prompt_cache`; a step gathers its rows with `TextPromptCache.batch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mcd_jax.method.probes import LinearProbe
from mcd_jax.method.transform import Transform

TERM_NAMES = ("refusal", "harmfulness", "complement", "consistency")
ENGLISH = "en"


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and variants of the objective. The default weights are the MCD authors'.

    Attributes:
        refusal_weight: Weight of L_r.
        harmfulness_weight: Weight of L_h.
        complement_weight: Weight of L_U.
        consistency_weight: Weight of L_m, ignored in DRO mode.
        consistency_target: "text_prompt" (the target of L_m is the mean text-prompt state
            of the other training languages, precomputed) or "soft_prompt" (the mean of the
            other languages' soft-prompt states). `parallel_objective` computes the
            "soft_prompt" targets from its batch; the one-language functions take them from
            the caller, who can compute them with `soft_prompt_consistency_targets`.
        mode: "mcd" (all four terms) or "dro" (no L_m; English data only).
        dropped_term: For ablations, one of TERM_NAMES whose weight is set to 0. The term
            is still computed and logged when its inputs are given.
    """

    refusal_weight: float = 1.0
    harmfulness_weight: float = 0.01
    complement_weight: float = 0.001
    consistency_weight: float = 0.001
    consistency_target: Literal["text_prompt", "soft_prompt"] = "text_prompt"
    mode: Literal["mcd", "dro"] = "mcd"
    dropped_term: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("mcd", "dro"):
            raise ValueError(f"mode={self.mode!r} is invalid; use 'mcd' or 'dro'")
        if self.consistency_target not in ("text_prompt", "soft_prompt"):
            raise ValueError(
                f"consistency_target={self.consistency_target!r} is invalid; "
                "use 'text_prompt' or 'soft_prompt'"
            )
        if self.dropped_term is not None and self.dropped_term not in TERM_NAMES:
            raise ValueError(
                f"dropped_term={self.dropped_term!r} is invalid; use None or one of {TERM_NAMES}"
            )
        if self.mode == "dro" and self.dropped_term == "consistency":
            raise ValueError("DRO mode has no consistency term (L_m) to drop")
        for name in TERM_NAMES:
            weight = getattr(self, f"{name}_weight")
            if weight < 0:
                raise ValueError(f"{name}_weight={weight} is invalid; weights must be >= 0")

    def weights(self) -> dict[str, float]:
        """Map each term of this mode to its weight, 0 for the dropped term."""
        names = TERM_NAMES if self.mode == "mcd" else TERM_NAMES[:3]
        return {
            name: 0.0 if name == self.dropped_term else float(getattr(self, f"{name}_weight"))
            for name in names
        }


@struct.dataclass
class BaseTargets:
    """Base side of the objective for one batch, fixed except in the "soft_prompt" variant.

    In that variant `consistency` comes from the batch's soft-prompt states, so gradients
    can flow into it. Every other field comes from text-prompt states.

    Attributes:
        refusal_logits: f_r(T(x0_en)[:m]), `[batch]`.
        harmfulness_logits: f_h(T(x0_en)[:m]), `[batch]`.
        complement: T(x0_lang)[m:], `[batch, d - m]`.
        consistency: Target of L_m, already transformed, `[batch, d]`; None in DRO mode or
            when L_m is not computed.
    """

    refusal_logits: jax.Array
    harmfulness_logits: jax.Array
    complement: jax.Array
    consistency: jax.Array | None = None


@struct.dataclass
class TextPromptCache:
    """Per-run arrays computed once from the text-prompt states of a parallel set.

    Attributes:
        refusal_logits: f_r(T(x0_en)[:m]), `[n]`.
        harmfulness_logits: f_h(T(x0_en)[:m]), `[n]`.
        complement: T(x0_lang)[m:] for each training language, `[languages, n, d - m]`.
        consistency: Mean of T(x0_j) over the languages j other than each language,
            `[languages, n, d]`; None with a single language.
        languages: Training language codes in the order of the leading axes (static).
    """

    refusal_logits: jax.Array
    harmfulness_logits: jax.Array
    complement: jax.Array
    consistency: jax.Array | None
    languages: tuple[str, ...] = struct.field(pytree_node=False)

    def language_index(self, language: str) -> int:
        """Return the position of `language` on the leading axis.

        Raises:
            ValueError: If the cache has no such language.
        """
        if language not in self.languages:
            raise ValueError(
                f"language {language!r} is not in the text-prompt cache {self.languages}"
            )
        return self.languages.index(language)

    def batch(self, language: str | int | jax.Array, example_indices: jax.Array) -> BaseTargets:
        """Gather the base targets of a batch.

        Args:
            language: Language code, or its index (an int or traced scalar inside jit).
            example_indices: Rows of the parallel set, `[batch]`.

        Returns:
            The batch's `BaseTargets`, with `consistency` None for a single language.
        """
        index = self.language_index(language) if isinstance(language, str) else language
        consistency = None
        if self.consistency is not None:
            consistency = self.consistency[index][example_indices]
        return BaseTargets(
            refusal_logits=self.refusal_logits[example_indices],
            harmfulness_logits=self.harmfulness_logits[example_indices],
            complement=self.complement[index][example_indices],
            consistency=consistency,
        )


def leave_one_out_mean(values: jax.Array) -> jax.Array:
    """For each entry of the leading axis, average the other entries.

    Args:
        values: `[languages, ...]` with at least 2 languages.

    Returns:
        `[languages, ...]`, entry l being the mean of values[j] over j != l.

    Raises:
        ValueError: If there are fewer than 2 languages.
    """
    count = values.shape[0]
    if count < 2:
        raise ValueError(f"the mean over the other languages needs >= 2 languages; got {count}")
    return (jnp.sum(values, axis=0, keepdims=True) - values) / (count - 1)


def precompute_text_prompt_cache(
    text_prompt_states: jax.Array,
    languages: Sequence[str],
    transform: Transform,
    refusal_probe: LinearProbe,
    harmfulness_probe: LinearProbe,
) -> TextPromptCache:
    """Compute the cached base targets once per run from the text-prompt states.

    Args:
        text_prompt_states: x0 of a parallel set, `[languages, n, d]`, row i being the same
            query in every language.
        languages: Language codes of the leading axis; must include "en", whose states are
            the base of L_r and L_h.
        transform: The fitted transform.
        refusal_probe: f_r.
        harmfulness_probe: f_h.

    Returns:
        The `TextPromptCache`; its `consistency` is None when there is one language.

    Raises:
        ValueError: If the shapes disagree with `languages` or the transform, a language is
            repeated, or English is missing.
    """
    languages = tuple(languages)
    _check_parallel_states(text_prompt_states, languages, transform)
    transformed = transform(text_prompt_states)
    english_safety = transformed[languages.index(ENGLISH), :, : transform.num_components]
    consistency = leave_one_out_mean(transformed) if len(languages) > 1 else None
    return TextPromptCache(
        refusal_logits=refusal_probe(english_safety),
        harmfulness_logits=harmfulness_probe(english_safety),
        complement=transformed[..., transform.num_components :],
        consistency=consistency,
        languages=languages,
    )


def _check_parallel_states(
    states: jax.Array, languages: tuple[str, ...], transform: Transform
) -> None:
    if states.ndim != 3 or states.shape[0] != len(languages):
        raise ValueError(
            f"text-prompt states must have shape [languages={len(languages)}, n, d]; "
            f"got {states.shape}"
        )
    if states.shape[2] != transform.hidden_size:
        raise ValueError(
            f"text-prompt states have size {states.shape[2]} but the transform was fitted on "
            f"size {transform.hidden_size}; use states and transform of the same model"
        )
    if len(set(languages)) != len(languages):
        raise ValueError(f"languages {languages} contain a duplicate")
    if ENGLISH not in languages:
        raise ValueError(
            f"languages {languages} lack {ENGLISH!r}; L_r and L_h subtract the English "
            "text-prompt state, so the parallel set needs English"
        )


def soft_prompt_consistency_targets(soft_states: jax.Array, transform: Transform) -> jax.Array:
    """Compute the L_m targets of the "soft_prompt" variant inside a step.

    Gradients flow through the targets because soft-prompt states sit on both sides of this
    variant's L_m. Wrap the result in `jax.lax.stop_gradient` to treat them as fixed.

    Args:
        soft_states: xθ of the same queries in every training language,
            `[languages, batch, d]`.
        transform: The fitted transform.

    Returns:
        Mean of T(xθ_j) over the other languages j, `[languages, batch, d]`.
    """
    return leave_one_out_mean(transform(soft_states))


def base_targets_from_states(
    base_states_en: jax.Array,
    base_states_lang: jax.Array,
    consistency_targets: jax.Array | None,
    transform: Transform,
    refusal_probe: LinearProbe,
    harmfulness_probe: LinearProbe,
) -> BaseTargets:
    """Build a batch's base targets from raw text-prompt states.

    Prefer `precompute_text_prompt_cache` in training, which does this once per run.

    Args:
        base_states_en: x0 of the batch's queries in English, `[batch, d]`.
        base_states_lang: x0 of the batch's queries in the batch's language, `[batch, d]`.
        consistency_targets: The L_m target, already transformed, `[batch, d]`, or None.
        transform: The fitted transform.
        refusal_probe: f_r.
        harmfulness_probe: f_h.

    Returns:
        The batch's `BaseTargets`.
    """
    english_safety = transform.safety(base_states_en)
    return BaseTargets(
        refusal_logits=refusal_probe(english_safety),
        harmfulness_logits=harmfulness_probe(english_safety),
        complement=transform.complement(base_states_lang),
        consistency=consistency_targets,
    )


def objective_from_targets(
    soft_states: jax.Array,
    targets: BaseTargets,
    labels: jax.Array,
    transform: Transform,
    refusal_probe: LinearProbe,
    harmfulness_probe: LinearProbe,
    config: ObjectiveConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the weighted objective of a batch from its base targets.

    Args:
        soft_states: xθ, the soft-prompt states, `[batch, d]`; the gradient flows here.
        targets: The batch's base targets, from `TextPromptCache.batch` or
            `base_targets_from_states`.
        labels: 0 = harmful, 1 = harmless, `[batch]`.
        transform: The fitted transform.
        refusal_probe: f_r.
        harmfulness_probe: f_h.
        config: Weights and variant.

    Returns:
        `(total, terms)`: the weighted sum, a scalar, and a dict with every computed term
        (before weighting) under its TERM_NAMES key plus "total".

    Raises:
        ValueError: If a shape does not fit the batch and transform, L_m is weighted but
            its targets are missing, or targets are given in DRO mode.
    """
    _check_batch_shapes(soft_states, targets, labels, transform)
    _check_consistency_input(targets.consistency, config)
    transformed = transform(soft_states)
    labels = labels.astype(transformed.dtype)
    m = transform.num_components
    safety = transformed[..., :m]

    terms = {
        "refusal": _bce(refusal_probe(safety) - targets.refusal_logits, labels),
        "harmfulness": _bce(harmfulness_probe(safety) - targets.harmfulness_logits, labels),
        "complement": jnp.mean(jnp.square(transformed[..., m:] - targets.complement)),
    }
    if targets.consistency is not None:
        terms["consistency"] = jnp.mean(jnp.square(transformed - targets.consistency))

    weights = config.weights()
    total = sum(weights[name] * value for name, value in terms.items())
    terms["total"] = total
    return total, terms


def _bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


def _check_batch_shapes(
    soft_states: jax.Array, targets: BaseTargets, labels: jax.Array, transform: Transform
) -> None:
    if soft_states.ndim != 2:
        raise ValueError(f"soft_states has shape {soft_states.shape}, expected [batch, d]")
    batch, d, m = soft_states.shape[0], transform.hidden_size, transform.num_components
    shapes = {
        "soft_states": (soft_states.shape, (batch, d)),
        "labels": (labels.shape, (batch,)),
        "refusal_logits": (targets.refusal_logits.shape, (batch,)),
        "harmfulness_logits": (targets.harmfulness_logits.shape, (batch,)),
        "complement": (targets.complement.shape, (batch, d - m)),
    }
    if targets.consistency is not None:
        shapes["consistency"] = (targets.consistency.shape, (batch, d))
    for name, (shape, expected) in shapes.items():
        if tuple(shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(shape)}, expected {expected} for a batch of {batch} "
                f"states of size {d} and a transform with {m} components"
            )


def _check_consistency_input(consistency: jax.Array | None, config: ObjectiveConfig) -> None:
    if config.mode == "dro" and consistency is not None:
        raise ValueError(
            "DRO mode has no consistency term (L_m); pass no consistency targets, for example "
            "by building the text-prompt cache from English alone"
        )
    needed = config.mode == "mcd" and config.weights()["consistency"] > 0
    if needed and consistency is None:
        raise ValueError(
            "MCD mode with consistency_weight > 0 needs consistency targets for L_m; pass "
            "them (the cache has none for a single language), or use mode='dro', "
            "consistency_weight=0 or dropped_term='consistency'"
        )


def mcd_objective(
    soft_states: jax.Array,
    base_states_en: jax.Array,
    base_states_lang: jax.Array | None,
    consistency_targets: jax.Array | None,
    labels: jax.Array,
    transform: Transform,
    refusal_probe: LinearProbe,
    harmfulness_probe: LinearProbe,
    config: ObjectiveConfig | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the DRO or MCD objective of a batch from raw states.

    Args:
        soft_states: xθ, `[batch, d]`; the gradient flows here.
        base_states_en: English text-prompt states of the same queries, `[batch, d]`.
        base_states_lang: Text-prompt states in the batch's language, `[batch, d]`; None
            means the batch is English and `base_states_en` is used.
        consistency_targets: The L_m target, already transformed, `[batch, d]`: the mean of
            T(x0) over the other training languages ("text_prompt"), or of T(xθ)
            ("soft_prompt"). None in DRO mode or when L_m has weight 0.
        labels: 0 = harmful, 1 = harmless, `[batch]`.
        transform: The fitted transform.
        refusal_probe: f_r.
        harmfulness_probe: f_h.
        config: Weights and variant; the default `ObjectiveConfig` (MCD) when None.

    Returns:
        `(total, terms)` as `objective_from_targets` returns them.
    """
    config = config or ObjectiveConfig()
    if base_states_lang is None:
        base_states_lang = base_states_en
    targets = base_targets_from_states(
        base_states_en,
        base_states_lang,
        consistency_targets,
        transform,
        refusal_probe,
        harmfulness_probe,
    )
    return objective_from_targets(
        soft_states, targets, labels, transform, refusal_probe, harmfulness_probe, config
    )


def parallel_objective(
    soft_states: jax.Array,
    cache: TextPromptCache,
    example_indices: jax.Array,
    labels: jax.Array,
    transform: Transform,
    refusal_probe: LinearProbe,
    harmfulness_probe: LinearProbe,
    config: ObjectiveConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Compute the objective of a batch that contains every training language of each query.

    This is the step of the parallel schedule. Each term is averaged over all
    `languages * batch` rows. In "soft_prompt" mode the L_m targets come from this batch's
    own soft-prompt states, with gradients through both sides of L_m.

    Args:
        soft_states: xθ, `[languages, batch, d]`, in the cache's language order.
        cache: The run's text-prompt cache.
        example_indices: Rows of the parallel set, `[batch]`.
        labels: 0 = harmful, 1 = harmless, `[batch]`.
        transform: The fitted transform.
        refusal_probe: f_r.
        harmfulness_probe: f_h.
        config: Weights and variant.

    Returns:
        `(total, terms)` as `objective_from_targets` returns them.

    Raises:
        ValueError: If soft_states does not have one entry per cached language.
    """
    num_languages = len(cache.languages)
    if soft_states.ndim != 3 or soft_states.shape[0] != num_languages:
        raise ValueError(
            f"soft-prompt states must have shape [languages={num_languages}, batch, d] for "
            f"languages {cache.languages}; got {soft_states.shape}"
        )
    batch = soft_states.shape[1]

    consistency = None
    soft_targets = config.mode == "mcd" and config.consistency_target == "soft_prompt"
    if soft_targets and num_languages > 1:
        consistency = soft_prompt_consistency_targets(soft_states, transform)
    elif config.mode == "mcd" and not soft_targets and cache.consistency is not None:
        consistency = cache.consistency[:, example_indices]

    def rows(values: jax.Array) -> jax.Array:
        return values.reshape(num_languages * batch, *values.shape[2:])

    def tiled(values: jax.Array) -> jax.Array:
        return jnp.tile(values, num_languages)

    targets = BaseTargets(
        refusal_logits=tiled(cache.refusal_logits[example_indices]),
        harmfulness_logits=tiled(cache.harmfulness_logits[example_indices]),
        complement=rows(cache.complement[:, example_indices]),
        consistency=None if consistency is None else rows(consistency),
    )
    return objective_from_targets(
        rows(soft_states),
        targets,
        tiled(labels),
        transform,
        refusal_probe,
        harmfulness_probe,
        config,
    )
