"""PCA, basis completion and the transform, checked against planted subspaces and NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from mcd_jax.method.transform import (
    Transform,
    apply_transform,
    complement_coordinates,
    complete_basis,
    fit_transform,
    principal_components,
    safety_coordinates,
)

HIDDEN_SIZE = 64
NUM_STATES = 800
PLANTED_SCALES = np.array([8.0, 6.0, 4.0, 2.0])
NOISE = 0.01


def _planted_states(seed: int = 0, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    """Return states with variance mostly in a random 4-dimensional subspace, and its basis."""
    rng = np.random.default_rng(seed)
    planted, _ = np.linalg.qr(rng.normal(size=(HIDDEN_SIZE, 4)))
    # Centered, orthogonal score columns make the sample covariance inside the planted
    # subspace exactly diagonal, so each principal direction is one planted column.
    raw_scores = rng.normal(size=(NUM_STATES, 4))
    unit_scores, _ = np.linalg.qr(raw_scores - raw_scores.mean(axis=0))
    scores = unit_scores * np.sqrt(NUM_STATES) * PLANTED_SCALES
    offset = rng.normal(size=HIDDEN_SIZE) * 3.0
    states = scores @ planted.T + noise * rng.normal(size=(NUM_STATES, HIDDEN_SIZE)) + offset
    return states.astype(np.float32), planted


def test_pca_recovers_planted_subspace():
    states, planted = _planted_states()
    _, components, _ = principal_components(jnp.asarray(states), num_components=4)
    components = np.asarray(components, dtype=np.float64)

    # The spectral norm of the planted basis projected off the components' span is the sine
    # of the largest principal angle between the two subspaces.
    residual = planted - components @ (components.T @ planted)
    largest_angle_sine = np.linalg.norm(residual, ord=2)

    # First-order perturbation theory puts the sine near noise * sqrt(d / n) / smallest scale,
    # 1.4e-3 here. A wrong subspace gives a sine near 1, far above the margin of 3.
    noise_bound = NOISE * np.sqrt(HIDDEN_SIZE / NUM_STATES) / PLANTED_SCALES.min()
    assert largest_angle_sine < 3 * noise_bound


def test_pca_sorts_components_by_variance():
    states, planted = _planted_states()
    _, components, ratios = principal_components(jnp.asarray(states), num_components=4)
    ratios = np.asarray(ratios)

    # Each planted direction has its own scale, so component k matches planted column k.
    for k in range(4):
        assert abs(float(planted[:, k] @ np.asarray(components)[:, k])) > 0.999
    assert np.all(np.diff(ratios) < 0)


def test_explained_variance_ratio_matches_numpy():
    states, _ = _planted_states()
    _, _, ratios = principal_components(jnp.asarray(states), num_components=4)

    centered = states.astype(np.float64) - states.astype(np.float64).mean(axis=0)
    eigenvalues = np.sort(np.linalg.eigvalsh(centered.T @ centered))[::-1]
    expected = eigenvalues[:4] / eigenvalues.sum()
    np.testing.assert_allclose(np.asarray(ratios), expected, rtol=1e-4)


def test_pca_mean_is_column_mean():
    states, _ = _planted_states()
    mean, _, _ = principal_components(jnp.asarray(states), num_components=4)
    np.testing.assert_allclose(np.asarray(mean), states.mean(axis=0), atol=1e-5)


def test_pca_sign_ignores_data_negation():
    # Negating the data leaves the principal directions unchanged up to sign; the sign rule
    # must pick the same sign for both.
    states, _ = _planted_states()
    _, components, _ = principal_components(jnp.asarray(states), num_components=4)
    _, negated_components, _ = principal_components(jnp.asarray(-states), num_components=4)
    np.testing.assert_allclose(np.asarray(components), np.asarray(negated_components), atol=1e-4)

    largest = np.argmax(np.abs(np.asarray(components)), axis=0)
    assert np.all(np.asarray(components)[largest, np.arange(4)] > 0)


# The seeded completion runs an O(d^3) QR, so it is checked at the small size only.
@pytest.mark.parametrize(("hidden_size", "seed"), [(64, None), (64, 42), (512, None)])
def test_completed_basis_is_orthonormal(hidden_size, seed):
    rng = np.random.default_rng(1)
    components, _ = np.linalg.qr(rng.normal(size=(hidden_size, 4)))
    basis = np.asarray(complete_basis(jnp.asarray(components, jnp.float32), seed=seed))

    assert basis.shape == (hidden_size, hidden_size)
    np.testing.assert_allclose(basis.T @ basis, np.eye(hidden_size), atol=1e-5)
    np.testing.assert_allclose(basis[:, :4], components, atol=1e-6)


def test_completed_basis_is_deterministic():
    rng = np.random.default_rng(2)
    components, _ = np.linalg.qr(rng.normal(size=(HIDDEN_SIZE, 4)))
    components = jnp.asarray(components, jnp.float32)

    householder = np.asarray(complete_basis(components))
    np.testing.assert_array_equal(householder, np.asarray(complete_basis(components)))

    first = np.asarray(complete_basis(components, seed=42))
    again = np.asarray(complete_basis(components, seed=42))
    other = np.asarray(complete_basis(components, seed=7))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first[:, 4:] - other[:, 4:]).max() > 0.1
    np.testing.assert_array_equal(first[:, :4], other[:, :4])


def test_apply_transform_matches_numpy():
    states, _ = _planted_states()
    transform = fit_transform(jnp.asarray(states), num_components=4)
    mean = np.asarray(transform.mean, dtype=np.float64)
    basis = np.asarray(transform.basis, dtype=np.float64)
    queries = states[:16].astype(np.float64)

    expected = (queries - mean) @ basis
    transformed = np.asarray(apply_transform(jnp.asarray(queries), transform.mean, transform.basis))
    np.testing.assert_allclose(transformed, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(transform(jnp.asarray(queries))), transformed)
    np.testing.assert_allclose(
        np.asarray(transform.safety(jnp.asarray(queries))), expected[:, :4], atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(transform.complement(jnp.asarray(queries))), expected[:, 4:], atol=1e-4
    )


def test_coordinate_slices_split_at_num_components():
    transformed = jnp.arange(2 * 3 * 10, dtype=jnp.float32).reshape(2, 3, 10)
    assert safety_coordinates(transformed, 4).shape == (2, 3, 4)
    assert complement_coordinates(transformed, 4).shape == (2, 3, 6)
    np.testing.assert_array_equal(
        np.concatenate(
            [safety_coordinates(transformed, 4), complement_coordinates(transformed, 4)], -1
        ),
        np.asarray(transformed),
    )


def test_safety_coordinates_are_pca_scores():
    states, _ = _planted_states()
    transform = fit_transform(jnp.asarray(states), num_components=4)
    centered = states.astype(np.float64) - states.mean(axis=0)
    _, singular_values, _ = np.linalg.svd(centered, full_matrices=False)

    scores = np.asarray(transform.safety(jnp.asarray(states)), dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(scores, axis=0), singular_values[:4], rtol=1e-4)


def test_bfloat16_states_are_transformed_in_float32():
    states, _ = _planted_states()
    transform = fit_transform(jnp.asarray(states))
    transformed = transform(jnp.asarray(states[:4], jnp.bfloat16))
    assert transformed.dtype == jnp.float32


def test_transform_save_load_round_trip(tmp_path):
    states, _ = _planted_states()
    transform = fit_transform(jnp.asarray(states), num_components=4)
    path = tmp_path / "transform.npz"
    transform.save(path)
    loaded = Transform.load(path)

    assert loaded.num_components == 4
    np.testing.assert_array_equal(np.asarray(loaded.mean), np.asarray(transform.mean))
    np.testing.assert_array_equal(np.asarray(loaded.basis), np.asarray(transform.basis))
    np.testing.assert_array_equal(
        np.asarray(loaded.explained_variance_ratio), np.asarray(transform.explained_variance_ratio)
    )


def test_transform_load_rejects_incomplete_file(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, mean=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="missing"):
        Transform.load(path)


def test_transform_load_rejects_mismatched_shapes(tmp_path):
    path = tmp_path / "mismatched.npz"
    np.savez(
        path,
        mean=np.zeros(8, np.float32),
        basis=np.eye(6, dtype=np.float32),
        explained_variance_ratio=np.ones(4, np.float32),
        num_components=np.int64(4),
    )
    with pytest.raises(ValueError, match="expected"):
        Transform.load(path)


@pytest.mark.parametrize(
    ("shape", "num_components", "message"),
    [
        ((10,), 4, r"shape \[n, d\]"),
        ((1, 8), 1, "at least 2 states"),
        ((10, 8), 9, "num_components=9"),
        ((3, 8), 4, "num_components=4"),
        ((10, 8), 0, "num_components=0"),
    ],
)
def test_pca_rejects_bad_input(shape, num_components, message):
    with pytest.raises(ValueError, match=message):
        principal_components(jnp.ones(shape), num_components)


def test_complete_basis_rejects_wide_input():
    with pytest.raises(ValueError, match=r"\[d, m\]"):
        complete_basis(jnp.ones((3, 5)))
