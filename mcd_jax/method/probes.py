"""Linear probes on the safety subspace, trained with K-fold cross validation.

The refusal probe predicts P(comply) from `T(h)[:m]` and is trained on soft labels, the
compliance rates in [0, 1]. The harmfulness probe predicts P(harmless) from the same
coordinates and is trained on binary labels (0 = harmful, 1 = harmless). Both are trained
as in the MCD authors' PyTorch code (the reference code). Training is full-batch AdamW
with early stopping on a held-out fold, over K folds from one seeded shuffle. The K
probes' weights and biases are then averaged into one probe. Unlike the reference code,
which trains only one fold of the harmfulness probe, every fold of both probes is trained.

All folds train at once: the fold loop is a `jax.vmap` over row masks, and each fold's
training loop is a `lax.while_loop` that carries its own early-stopping state.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

_HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class LinearProbe:
    """A linear map R^m -> R whose output is a logit.

    Attributes:
        weight: `[m]`, or `[folds, m]` for a stack of fold probes.
        bias: `[]`, or `[folds]` for a stack of fold probes.
    """

    weight: jax.Array
    bias: jax.Array

    def __call__(self, features: jax.Array) -> jax.Array:
        """Map safety-subspace coordinates `[..., m]` to logits `[...]`."""
        return jnp.matmul(features, self.weight, precision=_HIGHEST) + self.bias

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the probe to a NumPy `.npz` archive at exactly `path` (float32 arrays)."""
        with open(path, "wb") as file:
            np.savez(
                file,
                weight=np.asarray(self.weight, dtype=np.float32),
                bias=np.asarray(self.bias, dtype=np.float32),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearProbe:
        """Read a probe that `save` wrote.

        Raises:
            ValueError: If a key is missing or weight and bias do not fit together.
        """
        with np.load(path) as archive:
            missing = {"weight", "bias"} - set(archive.files)
            if missing:
                raise ValueError(
                    f"probe file {path} is missing {sorted(missing)}; write it with "
                    "LinearProbe.save"
                )
            weight, bias = archive["weight"], archive["bias"]
        if weight.ndim < 1 or bias.shape != weight.shape[:-1]:
            raise ValueError(
                f"probe file {path} has weight shape {weight.shape} and bias shape "
                f"{bias.shape}; expected [..., m] and [...]"
            )
        return cls(weight=jnp.asarray(weight), bias=jnp.asarray(bias))


@dataclasses.dataclass(frozen=True)
class ProbeTrainingConfig:
    """Settings of probe training, with the reference code's defaults.

    Attributes:
        learning_rate: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay, applied to weight and bias.
        max_steps: Maximum full-batch steps per fold, reached only if early stopping
            never triggers.
        eval_every: Steps between two evaluations of the held-out loss.
        patience: Evaluations in a row without improvement after which a fold stops.
        min_delta: Minimum decrease of the held-out loss that counts as improvement.
        num_folds: K of the K-fold cross validation, at least 2.
        seed: Seed of the shuffle that assigns rows to folds and of the initial weights.
    """

    learning_rate: float = 1e-4
    # NOTE: The reference code's weight decay, evaluation interval and step limit are not
    # documented. These assume torch.optim.AdamW's default decay (0.01) and one evaluation
    # per full-batch step; max_steps is only a safety limit.
    weight_decay: float = 0.01
    max_steps: int = 10_000
    eval_every: int = 1
    patience: int = 3
    min_delta: float = 1e-4
    num_folds: int = 10
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; it must be >= 1")
        if self.num_folds < 2:
            raise ValueError(f"num_folds={self.num_folds} is invalid; K-fold needs K >= 2")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} is invalid; it must be > 0")
        if self.min_delta < 0:
            raise ValueError(f"min_delta={self.min_delta} is invalid; it must be >= 0")


@struct.dataclass
class ProbeFit:
    """A trained probe and what cross validation measured.

    Attributes:
        probe: The fold probes' weights and biases averaged, weight `[m]`, bias `[]`.
        fold_probes: Each fold's probe at its best held-out loss, weight `[folds, m]`,
            bias `[folds]`.
        heldout_loss: Each fold's held-out BCE at that point, `[folds]`.
        heldout_accuracy: Each fold's held-out accuracy at that point, `[folds]`, with
            soft labels rounded at 0.5 and a logit above 0 predicting 1.
        steps: Steps each fold trained before it stopped, `[folds]`.
    """

    probe: LinearProbe
    fold_probes: LinearProbe
    heldout_loss: jax.Array
    heldout_accuracy: jax.Array
    steps: jax.Array


def kfold_masks(num_examples: int, num_folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign rows to K folds after one seeded shuffle.

    Fold sizes differ by at most one, as `np.array_split` makes them.

    Args:
        num_examples: n, at least `num_folds`.
        num_folds: K.
        seed: Seed of the shuffle.

    Returns:
        `(train_mask [K, n], heldout_mask [K, n])`, float32, with heldout_mask[k] marking
        fold k and train_mask[k] every other row.

    Raises:
        ValueError: If there are fewer rows than folds.
    """
    if num_examples < num_folds:
        raise ValueError(
            f"{num_examples} examples cannot fill {num_folds} folds; "
            "lower num_folds or pass more examples"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    heldout_mask = np.zeros((num_folds, num_examples), dtype=np.float32)
    for fold, rows in enumerate(np.array_split(order, num_folds)):
        heldout_mask[fold, rows] = 1.0
    return 1.0 - heldout_mask, heldout_mask


def fit_probe(
    features: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    config: ProbeTrainingConfig | None = None,
    initial: LinearProbe | None = None,
) -> ProbeFit:
    """Train a linear probe with K-fold cross validation and average the K fold probes.

    Args:
        features: Safety-subspace coordinates `T(h)[:m]`, `[n, m]`.
        labels: Targets in [0, 1], `[n]`: compliance rates for the refusal probe, or
            0 = harmful / 1 = harmless for the harmfulness probe.
        config: Training settings; the reference defaults when None.
        initial: Each fold's starting probe, weight `[folds, m]` and bias `[folds]`; when
            None, drawn from `config.seed` as torch.nn.Linear initialises its weights.

    Returns:
        The averaged probe and the per-fold results.

    Raises:
        ValueError: If the shapes disagree, a label is outside [0, 1] or not finite, or all
            labels are equal (the probe direction is then undefined), or `initial` has
            the wrong shape.
    """
    config = config or ProbeTrainingConfig()
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    _check_probe_data(features, labels)

    train_mask, heldout_mask = kfold_masks(len(labels), config.num_folds, config.seed)
    if initial is None:
        initial = _initial_probes(features.shape[1], config)
    expected = ((config.num_folds, features.shape[1]), (config.num_folds,))
    if (initial.weight.shape, initial.bias.shape) != expected:
        raise ValueError(
            f"initial probes have weight shape {initial.weight.shape} and bias shape "
            f"{initial.bias.shape}; expected {expected[0]} and {expected[1]} (one per fold)"
        )
    initial = LinearProbe(
        weight=jnp.asarray(initial.weight, jnp.float32), bias=jnp.asarray(initial.bias, jnp.float32)
    )
    fold_probes, heldout_loss, heldout_accuracy, steps = _train_folds(
        jnp.asarray(features), jnp.asarray(labels), train_mask, heldout_mask, initial, config
    )
    probe = LinearProbe(weight=fold_probes.weight.mean(axis=0), bias=fold_probes.bias.mean())
    logging.info(
        "Trained %d-fold probe on %d examples: held-out loss %.4f, accuracy %.3f, steps %s",
        config.num_folds,
        len(labels),
        float(heldout_loss.mean()),
        float(heldout_accuracy.mean()),
        np.asarray(steps).tolist(),
    )
    return ProbeFit(probe, fold_probes, heldout_loss, heldout_accuracy, steps)


def _check_probe_data(features: np.ndarray, labels: np.ndarray) -> None:
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"a probe needs features [n, m] and labels [n]; got shapes {features.shape} "
            f"and {labels.shape}"
        )
    if not np.all(np.isfinite(features)):
        raise ValueError("probe features contain NaN or infinite values")
    if not np.all((labels >= 0.0) & (labels <= 1.0)):
        bad = labels[~((labels >= 0.0) & (labels <= 1.0))][:5]
        raise ValueError(f"probe labels must lie in [0, 1]; got values such as {bad.tolist()}")
    if labels.min() == labels.max():
        raise ValueError(
            f"every probe label is {labels[0]}, so the probe direction is undefined; "
            "the anchor set needs both outcomes (some refusals and some compliance, or "
            "both harmful and harmless queries)"
        )


def _initial_probes(num_features: int, config: ProbeTrainingConfig) -> LinearProbe:
    """Draw each fold's initial probe like torch.nn.Linear: U(-1/sqrt(m), 1/sqrt(m))."""
    bound = 1.0 / np.sqrt(num_features)
    weight_key, bias_key = jax.random.split(jax.random.key(config.seed))
    shape = (config.num_folds, num_features)
    return LinearProbe(
        weight=jax.random.uniform(weight_key, shape, minval=-bound, maxval=bound),
        bias=jax.random.uniform(bias_key, (config.num_folds,), minval=-bound, maxval=bound),
    )


def _masked_bce(probe: LinearProbe, features, labels, mask) -> jax.Array:
    losses = optax.sigmoid_binary_cross_entropy(probe(features), labels)
    return jnp.sum(losses * mask) / jnp.sum(mask)


def _masked_accuracy(probe: LinearProbe, features, labels, mask) -> jax.Array:
    correct = (probe(features) > 0) == (labels > 0.5)
    return jnp.sum(correct * mask) / jnp.sum(mask)


@functools.partial(jax.jit, static_argnames="config")
def _train_folds(features, labels, train_mask, heldout_mask, initial, config):
    train_one = functools.partial(_train_fold, features, labels, config=config)
    return jax.vmap(train_one)(train_mask, heldout_mask, initial)


def _train_fold(features, labels, train_mask, heldout_mask, initial, *, config):
    """Train one fold until its held-out loss stops improving; keep the best probe."""
    optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    loss_gradient = jax.grad(_masked_bce)

    def keep_training(state):
        step, _, _, _, _, evaluations_without_improvement = state
        return (step < config.max_steps) & (evaluations_without_improvement < config.patience)

    def train_step(state):
        step, probe, opt_state, best_probe, best_loss, evaluations_without_improvement = state
        grads = loss_gradient(probe, features, labels, train_mask)
        updates, opt_state = optimizer.update(grads, opt_state, probe)
        probe = optax.apply_updates(probe, updates)
        step = step + 1

        heldout_loss = _masked_bce(probe, features, labels, heldout_mask)
        is_evaluation = step % config.eval_every == 0
        improved = is_evaluation & (heldout_loss < best_loss - config.min_delta)
        best_probe = jax.tree.map(lambda new, old: jnp.where(improved, new, old), probe, best_probe)
        best_loss = jnp.where(improved, heldout_loss, best_loss)
        evaluations_without_improvement = jnp.where(
            improved, 0, evaluations_without_improvement + is_evaluation.astype(jnp.int32)
        )
        return step, probe, opt_state, best_probe, best_loss, evaluations_without_improvement

    initial_loss = _masked_bce(initial, features, labels, heldout_mask)
    zero = jnp.zeros((), jnp.int32)
    state = (zero, initial, optimizer.init(initial), initial, initial_loss, zero)
    steps, _, _, best_probe, _, _ = jax.lax.while_loop(keep_training, train_step, state)

    best_loss = _masked_bce(best_probe, features, labels, heldout_mask)
    best_accuracy = _masked_accuracy(best_probe, features, labels, heldout_mask)
    return best_probe, best_loss, best_accuracy, steps
