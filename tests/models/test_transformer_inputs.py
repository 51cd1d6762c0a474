"""Transformer call arguments: defaults and the errors for malformed inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcd_jax.models import ModelConfig, Transformer

CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_default_positions_follow_left_padding(model):
    ids = jnp.asarray([[0, 0, 7, 8, 9], [5, 6, 7, 8, 9]])
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    explicit = jnp.asarray([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])

    default = model(ids, attention_mask=mask).hidden_states
    given = model(ids, attention_mask=mask, position_ids=explicit).hidden_states

    np.testing.assert_array_equal(default, given)


def test_padding_does_not_change_real_tokens(model):
    padded = model(jnp.asarray([[0, 0, 7, 8, 9]]), attention_mask=jnp.asarray([[0, 0, 1, 1, 1]]))
    unpadded = model(jnp.asarray([[7, 8, 9]]))

    np.testing.assert_allclose(padded.hidden_states[:, 2:], unpadded.hidden_states, atol=1e-5)


def test_both_ids_and_embeds(model):
    ids = jnp.zeros((1, 3), jnp.int32)

    with pytest.raises(ValueError, match=r"pass exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.embed(ids))


def test_neither_ids_nor_embeds(model):
    with pytest.raises(ValueError, match=r"pass exactly one of input_ids and inputs_embeds"):
        model()


def test_embeds_of_wrong_width(model):
    with pytest.raises(ValueError, match=r"inputs_embeds has shape \(1, 3, 16\); expected "):
        model(inputs_embeds=jnp.zeros((1, 3, 16)))


def test_mask_of_wrong_shape(model):
    expected = r"attention_mask has shape \(1, 4\); expected \(batch, seq\) = \(1, 3\)"
    with pytest.raises(ValueError, match=expected):
        model(jnp.zeros((1, 3), jnp.int32), attention_mask=jnp.ones((1, 4)))


def test_positions_of_wrong_shape(model):
    expected = r"position_ids has shape \(3,\); expected \(batch, seq\) = \(1, 3\)"
    with pytest.raises(ValueError, match=expected):
        model(jnp.zeros((1, 3), jnp.int32), position_ids=jnp.arange(3))


def test_logits_only_on_request(model):
    ids = jnp.zeros((2, 3), jnp.int32)

    without = model(ids)
    with_logits = model(ids, return_logits=True)

    assert without.logits is None
    assert with_logits.logits.shape == (2, 3, 50)
    np.testing.assert_array_equal(
        with_logits.logits, model.compute_logits(with_logits.hidden_states)
    )
