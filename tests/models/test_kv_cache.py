"""KV-cache decoding gives the outputs of one full forward pass over the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import make_torch_model, padded_batch, torch_reference

from mcd_jax.models import load_model

TOLERANCE = 1e-4
PREFILL = 6  # tokens of the [3, 12] batch written by the first (prefill) call


@nnx.jit
def _cached_call(model, ids, mask, cache):
    return model(ids, attention_mask=mask, cache=cache, return_logits=True)


# The mistral variant has a sliding window of 4, shorter than the 12-token sequence.
@pytest.mark.parametrize("variant", ["llama_untied_gqa", "mistral_sliding_window"])
def test_prefill_then_steps_match_full_forward(variant, tmp_path):
    torch_model = make_torch_model(variant)
    torch_model.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=jnp.float32).model
    ids, mask, positions = padded_batch("left")
    hidden_ref, logits_ref = torch_reference(torch_model, ids, mask, positions)
    batch, seq = ids.shape
    # With a cache the mask covers every slot; slots not yet written are masked by causality.
    cache_mask = jnp.asarray(mask)
    cache = model.init_cache(batch, seq, jnp.float32)

    output = _cached_call(model, jnp.asarray(ids[:, :PREFILL]), cache_mask, cache)
    hidden_steps, logits_steps = [output.hidden_states], [output.logits]
    for step in range(PREFILL, seq):
        assert int(output.cache.index) == step
        output = _cached_call(model, jnp.asarray(ids[:, step : step + 1]), cache_mask, output.cache)
        hidden_steps.append(output.hidden_states)
        logits_steps.append(output.logits)

    hidden = np.concatenate(hidden_steps, axis=1)
    logits = np.concatenate(logits_steps, axis=1)
    real = mask.astype(bool)
    assert np.abs(hidden - hidden_ref)[real].max() <= TOLERANCE
    assert np.abs(logits - logits_ref)[real].max() <= TOLERANCE


def test_cache_decodes_inside_fori_loop(tmp_path):
    torch_model = make_torch_model("qwen2_sliding_layers")
    torch_model.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=jnp.float32).model
    ids, mask, positions = padded_batch("left")
    _, logits_ref = torch_reference(torch_model, ids, mask, positions)
    batch, seq = ids.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, ids, mask):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(batch, seq, jnp.float32)
        first = model(ids[:, :PREFILL], attention_mask=mask, cache=cache, return_logits=True)
        last_logits = jnp.zeros((batch, seq, model.config.vocab_size), jnp.float32)
        last_logits = last_logits.at[:, PREFILL - 1].set(first.logits[:, -1])

        def body(step, carry):
            cache, last_logits = carry
            token = jax.lax.dynamic_slice_in_dim(ids, step, 1, axis=1)
            out = model(token, attention_mask=mask, cache=cache, return_logits=True)
            return out.cache, last_logits.at[:, step].set(out.logits[:, 0])

        _, last_logits = jax.lax.fori_loop(PREFILL, seq, body, (first.cache, last_logits))
        return last_logits

    logits = np.asarray(decode(state, jnp.asarray(ids), jnp.asarray(mask)))

    steps = np.arange(PREFILL - 1, seq)
    assert np.abs(logits[:, steps] - logits_ref[:, steps]).max() <= TOLERANCE


def test_cache_rejects_mask_of_sequence_length(tmp_path):
    make_torch_model("llama_untied_gqa").save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=jnp.float32).model
    cache = model.init_cache(2, 10)

    expected = (
        r"attention_mask has shape \(2, 3\); expected \(batch, "
        r"max_len\) of the cache = \(2, 10\)"
    )
    with pytest.raises(ValueError, match=expected):
        model(jnp.zeros((2, 3), jnp.int32), attention_mask=jnp.ones((2, 3)), cache=cache)


def test_init_cache_shape_and_dtype(tmp_path):
    make_torch_model("llama_untied_gqa").save_pretrained(tmp_path)
    model = load_model(tmp_path).model

    cache = model.init_cache(3, 16)

    assert cache.keys.shape == (2, 3, 16, 2, 16)
    assert cache.values.shape == (2, 3, 16, 2, 16)
    assert cache.keys.dtype == jnp.bfloat16
    assert int(cache.index) == 0
