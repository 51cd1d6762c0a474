import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mcd_jax.sampling import SamplingConfig, filter_logits, select_next_tokens


def _random_logits(seed: int = 0, batch: int = 4, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * 3


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (1.0, 1, 0.3)]
)
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = _random_logits()
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(filter_logits(jnp.asarray(logits), config))

    expected = torch.from_numpy(logits)
    expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    expected = expected.numpy()

    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    kept = ~np.isinf(expected)
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)


def test_top_k_one_equals_greedy():
    logits = jnp.asarray(_random_logits(1))
    config = SamplingConfig(temperature=1.0, top_k=1)
    sampled = select_next_tokens(logits, jnp.int32(0), jax.random.key(3), config)
    greedy = select_next_tokens(logits, jnp.int32(0), jax.random.key(3), SamplingConfig())
    np.testing.assert_array_equal(sampled, greedy)


def test_same_key_same_tokens():
    logits = jnp.asarray(_random_logits(2, batch=16))
    config = SamplingConfig(temperature=1.0, top_p=0.9)
    first = select_next_tokens(logits, jnp.int32(0), jax.random.key(7), config)
    second = select_next_tokens(logits, jnp.int32(0), jax.random.key(7), config)
    other = select_next_tokens(logits, jnp.int32(0), jax.random.key(8), config)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_min_new_tokens_blocks_stop_ids():
    logits = np.zeros((2, 10), np.float32)
    logits[:, 4] = 10.0  # The stop token is by far the most likely.
    config = SamplingConfig(max_new_tokens=5, min_new_tokens=2, stop_token_ids=(4,))
    early = select_next_tokens(jnp.asarray(logits), jnp.int32(1), jax.random.key(0), config)
    late = select_next_tokens(jnp.asarray(logits), jnp.int32(2), jax.random.key(0), config)
    assert not np.any(np.asarray(early) == 4)
    np.testing.assert_array_equal(late, [4, 4])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
