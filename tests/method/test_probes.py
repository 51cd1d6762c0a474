"""K-fold linear probes: planted directions, fold averaging, early stopping, bad input."""

import numpy as np
import pytest

from mcd_jax.method.probes import (
    LinearProbe,
    ProbeTrainingConfig,
    fit_probe,
    kfold_masks,
)

PLANTED_WEIGHT = np.array([2.0, -1.0, 0.5, 1.5])
PLANTED_BIAS = 0.3
# One example count for the tests that share FAST, so the jitted training compiles once.
NUM_EXAMPLES = 400

# The reference learning rate of 1e-4 suits PCA scores of hidden states, which are large.
# Unit-scale features need a larger rate to converge within a few hundred steps.
FAST = ProbeTrainingConfig(learning_rate=0.05, weight_decay=0.0, max_steps=2000, min_delta=1e-6)


def _logistic_data(num_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return features [n, 4] and P(label = 1) under the planted logistic model."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_examples, 4)).astype(np.float32)
    probabilities = 1.0 / (1.0 + np.exp(-(features @ PLANTED_WEIGHT + PLANTED_BIAS)))
    return features, probabilities.astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_probe_recovers_planted_direction_binary():
    features, probabilities = _logistic_data(NUM_EXAMPLES)
    labels = (np.random.default_rng(1).random(NUM_EXAMPLES) < probabilities).astype(np.float32)
    fit = fit_probe(features, labels, FAST)

    assert _cosine(np.asarray(fit.probe.weight), PLANTED_WEIGHT) > 0.95
    assert abs(float(fit.probe.bias) - PLANTED_BIAS) < 0.3


def test_probe_recovers_planted_direction_soft_labels():
    # Soft labels equal to the planted probabilities: the BCE minimiser is the planted probe.
    features, probabilities = _logistic_data(NUM_EXAMPLES)
    fit = fit_probe(features, probabilities, FAST)

    assert _cosine(np.asarray(fit.probe.weight), PLANTED_WEIGHT) > 0.99
    np.testing.assert_allclose(np.asarray(fit.probe.weight), PLANTED_WEIGHT, rtol=0.1)


def test_averaged_probe_is_mean_of_folds():
    features, probabilities = _logistic_data(NUM_EXAMPLES, seed=2)
    fit = fit_probe(features, probabilities, FAST)

    assert fit.fold_probes.weight.shape == (10, 4)
    assert fit.fold_probes.bias.shape == (10,)
    np.testing.assert_allclose(
        np.asarray(fit.probe.weight), np.asarray(fit.fold_probes.weight).mean(axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(fit.probe.bias), float(np.asarray(fit.fold_probes.bias).mean()), rtol=1e-6
    )


def test_every_fold_is_trained_for_binary_labels():
    # The reference trains only one fold of the harmfulness probe; here all K must move.
    features, probabilities = _logistic_data(NUM_EXAMPLES, seed=4)
    labels = (probabilities > 0.5).astype(np.float32)
    zeros = LinearProbe(weight=np.zeros((10, 4), np.float32), bias=np.zeros(10, np.float32))
    fit = fit_probe(features, labels, FAST, initial=zeros)

    assert np.all(np.asarray(fit.steps) > 0)
    assert np.all(np.linalg.norm(np.asarray(fit.fold_probes.weight), axis=1) > 0.1)
    assert np.all(np.asarray(fit.heldout_accuracy) > 0.8)


def test_fold_results_have_one_entry_per_fold():
    features, probabilities = _logistic_data(NUM_EXAMPLES, seed=5)
    fit = fit_probe(features, probabilities, FAST)

    assert fit.heldout_loss.shape == (10,)
    assert fit.heldout_accuracy.shape == (10,)
    assert fit.steps.shape == (10,)
    assert np.all(np.asarray(fit.steps) <= FAST.max_steps)


def _adamw_transcription(features, labels, train_rows, heldout_rows, config):
    """Train one fold from zeros with a plain NumPy AdamW loop (torch.optim.AdamW's update).

    The held-out BCE is evaluated after every step. A drop of more than min_delta below the
    best so far is an improvement and saves the probe. Training stops after `patience`
    evaluations in a row without one. Returns (weight, bias, steps).
    """
    x_train, y_train = features[train_rows].astype(np.float64), labels[train_rows]
    x_heldout, y_heldout = features[heldout_rows].astype(np.float64), labels[heldout_rows]

    def bce(weight, bias, x, y):
        z = x @ weight + bias
        return np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))

    params = np.zeros(features.shape[1] + 1)
    first_moment = np.zeros_like(params)
    second_moment = np.zeros_like(params)
    best_params = params.copy()
    best_loss = bce(params[:-1], params[-1], x_heldout, y_heldout)
    misses = 0
    step = 0
    while step < config.max_steps and misses < config.patience:
        z = x_train @ params[:-1] + params[-1]
        residual = 1.0 / (1.0 + np.exp(-z)) - y_train
        grad = np.append(x_train.T @ residual, residual.sum()) / len(y_train)

        step += 1
        params = params - config.learning_rate * config.weight_decay * params
        first_moment = 0.9 * first_moment + 0.1 * grad
        second_moment = 0.999 * second_moment + 0.001 * grad**2
        first_unbiased = first_moment / (1 - 0.9**step)
        second_unbiased = second_moment / (1 - 0.999**step)
        params = params - config.learning_rate * first_unbiased / (np.sqrt(second_unbiased) + 1e-8)

        loss = bce(params[:-1], params[-1], x_heldout, y_heldout)
        if loss < best_loss - config.min_delta:
            best_loss, best_params, misses = loss, params.copy(), 0
        else:
            misses += 1
    return best_params[:-1], best_params[-1], step


def test_folds_match_numpy_adamw_with_early_stopping():
    features, probabilities = _logistic_data(120, seed=3)
    config = ProbeTrainingConfig(
        learning_rate=0.01, weight_decay=0.01, max_steps=400, min_delta=1e-3, num_folds=4
    )
    zeros = LinearProbe(weight=np.zeros((4, 4), np.float32), bias=np.zeros(4, np.float32))
    fit = fit_probe(features, probabilities, config, initial=zeros)
    train_mask, heldout_mask = kfold_masks(120, 4, config.seed)

    for fold in range(4):
        weight, bias, steps = _adamw_transcription(
            features, probabilities, train_mask[fold] > 0, heldout_mask[fold] > 0, config
        )
        assert int(fit.steps[fold]) == steps, f"fold {fold}"
        np.testing.assert_allclose(np.asarray(fit.fold_probes.weight[fold]), weight, atol=1e-4)
        np.testing.assert_allclose(float(fit.fold_probes.bias[fold]), bias, atol=1e-4)
    # Early stopping, not max_steps, ended at least one fold.
    assert int(np.asarray(fit.steps).min()) < config.max_steps


def test_kfold_masks_hold_out_each_row_once():
    train_mask, heldout_mask = kfold_masks(23, 10, seed=42)

    np.testing.assert_array_equal(heldout_mask.sum(axis=0), np.ones(23))
    np.testing.assert_array_equal(train_mask + heldout_mask, np.ones((10, 23)))
    sizes = heldout_mask.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1


def test_kfold_masks_depend_only_on_seed():
    first, _ = kfold_masks(50, 10, seed=42)
    again, _ = kfold_masks(50, 10, seed=42)
    other, _ = kfold_masks(50, 10, seed=0)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_linear_probe_maps_batches_to_logits():
    probe = LinearProbe(weight=np.array([1.0, -2.0], np.float32), bias=np.float32(0.5))
    features = np.array([[[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]]], np.float32)
    np.testing.assert_allclose(np.asarray(probe(features)), [[-0.5, -3.5, 3.5]])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.full(20, 1.0), "every probe label is 1.0"),
        (np.linspace(-0.5, 1.0, 20), r"\[0, 1\]"),
        (np.linspace(0.0, 1.0, 19), "shapes"),
    ],
)
def test_fit_probe_rejects_bad_labels(labels, message):
    features = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match=message):
        fit_probe(features, labels, FAST)


def test_fit_probe_rejects_too_few_examples():
    features, probabilities = _logistic_data(6)
    with pytest.raises(ValueError, match="cannot fill 10 folds"):
        fit_probe(features, probabilities, FAST)


def test_fit_probe_rejects_wrong_initial_shape():
    features, probabilities = _logistic_data(40)
    initial = LinearProbe(weight=np.zeros((3, 4), np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="one per fold"):
        fit_probe(features, probabilities, FAST, initial=initial)


@pytest.mark.parametrize(
    "changes",
    [{"num_folds": 1}, {"patience": 0}, {"max_steps": 0}, {"learning_rate": 0.0}],
)
def test_probe_config_rejects_bad_values(changes):
    with pytest.raises(ValueError, match="invalid"):
        ProbeTrainingConfig(**changes)


def test_probe_save_load_round_trip(tmp_path):
    probe = LinearProbe(weight=np.array([0.5, -1.5, 2.0], np.float32), bias=np.float32(0.25))
    path = tmp_path / "refusal_probe"
    probe.save(path)
    loaded = LinearProbe.load(path)

    np.testing.assert_array_equal(np.asarray(loaded.weight), np.asarray(probe.weight))
    assert float(loaded.bias) == 0.25


def test_probe_load_rejects_mismatched_shapes(tmp_path):
    path = tmp_path / "probe.npz"
    np.savez(path, weight=np.zeros((2, 4), np.float32), bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="expected"):
        LinearProbe.load(path)
