"""The transform T(h) = (h - mean) @ basis that splits a hidden state into two parts.

PCA on the anchor set's states finds the safety subspace: the first `num_components`
principal directions. The basis completes those directions to a full orthonormal `[d, d]`
matrix, so `T(h)[..., :m]` are the safety-subspace coordinates that the refusal and
harmfulness probes read, and `T(h)[..., m:]` is the complement that L_U keeps in place.
Any orthonormal completion gives the same L_U and L_m, because both only use squared
distances that an orthonormal change of basis within the complement preserves.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DEFAULT_NUM_COMPONENTS = 4

# On TPU the default matmul precision rounds inputs to bfloat16. L_U and L_m square small
# differences of transformed states, so the transform and the probes multiply in float32.
_HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class Transform:
    """The fitted transform, a pytree that jit and device_put accept.

    Attributes:
        mean: PCA mean of the states the transform was fitted on, `[d]`.
        basis: Orthonormal basis whose first `num_components` columns are the principal
            directions sorted by explained variance, `[d, d]`.
        explained_variance_ratio: Fraction of the total variance that each principal
            direction explains, `[num_components]`.
        num_components: Size m of the safety subspace (static, not a traced leaf).
    """

    mean: jax.Array
    basis: jax.Array
    explained_variance_ratio: jax.Array
    num_components: int = struct.field(pytree_node=False)

    @property
    def hidden_size(self) -> int:
        """Size d of the hidden states the transform takes."""
        return int(self.mean.shape[-1])

    def __call__(self, states: jax.Array) -> jax.Array:
        """Map states `[..., d]` to transformed coordinates `[..., d]`."""
        return apply_transform(states, self.mean, self.basis)

    def safety(self, states: jax.Array) -> jax.Array:
        """Map states `[..., d]` to their safety-subspace coordinates `[..., m]`."""
        return safety_coordinates(self(states), self.num_components)

    def complement(self, states: jax.Array) -> jax.Array:
        """Map states `[..., d]` to their complement coordinates `[..., d - m]`."""
        return complement_coordinates(self(states), self.num_components)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the transform to a NumPy `.npz` archive at exactly `path` (float32 arrays)."""
        with open(path, "wb") as file:
            np.savez(
                file,
                mean=np.asarray(self.mean, dtype=np.float32),
                basis=np.asarray(self.basis, dtype=np.float32),
                explained_variance_ratio=np.asarray(
                    self.explained_variance_ratio, dtype=np.float32
                ),
                num_components=np.int64(self.num_components),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Transform:
        """Read a transform that `save` wrote, checking that the arrays fit together.

        Raises:
            ValueError: If a key is missing or the shapes are inconsistent.
        """
        with np.load(path) as archive:
            missing = {"mean", "basis", "explained_variance_ratio", "num_components"} - set(
                archive.files
            )
            if missing:
                raise ValueError(
                    f"transform file {path} is missing {sorted(missing)}; "
                    "write it with Transform.save"
                )
            arrays: dict[str, Any] = {key: archive[key] for key in archive.files}
        transform = cls(
            mean=jnp.asarray(arrays["mean"], dtype=jnp.float32),
            basis=jnp.asarray(arrays["basis"], dtype=jnp.float32),
            explained_variance_ratio=jnp.asarray(
                arrays["explained_variance_ratio"], dtype=jnp.float32
            ),
            num_components=int(arrays["num_components"]),
        )
        _check_transform_shapes(transform, source=str(path))
        return transform


def _check_transform_shapes(transform: Transform, source: str) -> None:
    d = transform.mean.shape[-1] if transform.mean.ndim == 1 else None
    if d is None or transform.basis.shape != (d, d):
        raise ValueError(
            f"transform from {source} has mean shape {transform.mean.shape} and basis shape "
            f"{transform.basis.shape}; expected [d] and [d, d]"
        )
    m = transform.num_components
    if not 1 <= m <= d or transform.explained_variance_ratio.shape != (m,):
        raise ValueError(
            f"transform from {source} has num_components={m} and explained_variance_ratio "
            f"shape {transform.explained_variance_ratio.shape}; expected 1 <= m <= {d} and [m]"
        )


def apply_transform(states: jax.Array, mean: jax.Array, basis: jax.Array) -> jax.Array:
    """Compute T(h) = (h - mean) @ basis in float32, or float64 for float64 states.

    Args:
        states: Hidden states `[..., d]`, any float dtype (bfloat16 is upcast).
        mean: `[d]`.
        basis: `[d, d]`.

    Returns:
        Transformed coordinates `[..., d]`.
    """
    dtype = jnp.promote_types(states.dtype, jnp.float32)
    centered = states.astype(dtype) - mean.astype(dtype)
    return jnp.matmul(centered, basis.astype(dtype), precision=_HIGHEST)


def safety_coordinates(transformed: jax.Array, num_components: int) -> jax.Array:
    """Slice transformed coordinates `[..., d]` to the safety subspace `[..., m]`."""
    return transformed[..., :num_components]


def complement_coordinates(transformed: jax.Array, num_components: int) -> jax.Array:
    """Slice transformed coordinates `[..., d]` to the complement `[..., d - m]`."""
    return transformed[..., num_components:]


def principal_components(
    states: jax.Array, num_components: int = DEFAULT_NUM_COMPONENTS
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run PCA on states in float32.

    Each component's sign is fixed so that its entry of largest magnitude is positive, which
    makes the result independent of the SVD routine's arbitrary signs.

    Args:
        states: `[n, d]` with n >= 2.
        num_components: m, at most min(n, d).

    Returns:
        `(mean [d], components [d, m], explained_variance_ratio [m])`, components as
        orthonormal columns sorted by decreasing explained variance.

    Raises:
        ValueError: If states is not 2-D, n < 2, or m is out of range.
    """
    _check_pca_input(states, num_components)
    return _principal_components(states.astype(jnp.float32), num_components)


@functools.partial(jax.jit, static_argnames="num_components")
def _principal_components(
    states: jax.Array, num_components: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    mean = jnp.mean(states, axis=0)

    # The right singular vectors of the centered data are the principal directions, and
    # jnp.linalg.svd returns the singular values in decreasing order.
    _, singular_values, right_vectors = jnp.linalg.svd(states - mean, full_matrices=False)
    components = right_vectors[:num_components].T

    largest = jnp.argmax(jnp.abs(components), axis=0)
    signs = jnp.sign(components[largest, jnp.arange(num_components)])
    components = components * jnp.where(signs == 0, 1.0, signs)

    variances = jnp.square(singular_values)
    explained_variance_ratio = variances[:num_components] / jnp.sum(variances)
    return mean, components, explained_variance_ratio


def _check_pca_input(states: jax.Array, num_components: int) -> None:
    if states.ndim != 2:
        raise ValueError(f"PCA needs states of shape [n, d]; got shape {states.shape}")
    n, d = states.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 states; got {n}. Pass more anchor states.")
    if not 1 <= num_components <= min(n, d):
        raise ValueError(
            f"num_components={num_components} is out of range for {n} states of size {d}; "
            f"choose 1 <= num_components <= {min(n, d)}"
        )


def complete_basis(components: jax.Array, seed: int | None = None) -> jax.Array:
    """Complete orthonormal columns to a full orthonormal basis, deterministically.

    With `seed=None`, the completion is the Q factor of a complete Householder QR of the
    components alone. Its m reflections cost O(d^2 m), about 1 s for d = 4096 on a CPU.
    With an integer seed, Gaussian random columns drawn from that seed follow the
    components before the QR, like the MCD authors' Gram-Schmidt on random vectors. That
    QR costs O(d^3), over a minute for d = 4096 on 2 CPU cores. Both are Householder QR,
    which keeps Q orthogonal to a few float32 ulps times d whatever the conditioning, while
    classical Gram-Schmidt does not. Column signs are fixed so that the first m columns
    equal the given components.

    Args:
        components: Orthonormal columns `[d, m]`.
        seed: None for the Householder completion, or the seed of a random completion.

    Returns:
        Orthonormal basis `[d, d]` whose first m columns are `components`.

    Raises:
        ValueError: If components is not 2-D with m <= d.
    """
    if components.ndim != 2 or components.shape[1] > components.shape[0]:
        raise ValueError(
            f"complete_basis needs orthonormal columns of shape [d, m] with m <= d; "
            f"got shape {components.shape}"
        )
    components = components.astype(jnp.float32)
    if seed is None:
        return _complete_basis(components, components)
    d, m = components.shape
    random_columns = jax.random.normal(jax.random.key(seed), (d, d - m), dtype=jnp.float32)
    return _complete_basis(components, jnp.concatenate([components, random_columns], axis=1))


@jax.jit
def _complete_basis(components: jax.Array, columns: jax.Array) -> jax.Array:
    """Orthonormalise `columns` `[d, k]` (components first) into a `[d, d]` basis."""
    m = components.shape[1]
    q, r = jnp.linalg.qr(columns, mode="complete")
    signs = jnp.sign(jnp.diagonal(r))
    signs = jnp.concatenate([jnp.where(signs == 0, 1.0, signs), jnp.ones(q.shape[1] - len(signs))])
    basis = q * signs

    # QR returns the components' span up to rounding; store the components themselves so
    # that the safety coordinates are exactly the PCA scores.
    return basis.at[:, :m].set(components)


def fit_transform(
    states: jax.Array,
    num_components: int = DEFAULT_NUM_COMPONENTS,
    seed: int | None = None,
) -> Transform:
    """Fit the transform on anchor states: PCA, then the orthonormal completion.

    Args:
        states: Anchor states under every prompt condition, `[n, d]`.
        num_components: Size m of the safety subspace.
        seed: None for the fast Householder basis completion, or the seed of a random
            completion (see `complete_basis`).

    Returns:
        The fitted `Transform`.
    """
    mean, components, explained_variance_ratio = principal_components(states, num_components)
    return Transform(
        mean=mean,
        basis=complete_basis(components, seed),
        explained_variance_ratio=explained_variance_ratio,
        num_components=num_components,
    )
