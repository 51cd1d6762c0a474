"""Round trip: tiny random transformers models saved to disk, loaded by us, same outputs.

The oracle is the transformers 5 PyTorch model itself, in float32. Only real (unpadded)
positions are compared, because outputs at padding positions are arbitrary in both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import VARIANTS, make_torch_model, padded_batch, torch_reference

from mcd_jax.models import load_model

# float32 on both sides; the remaining differences are summation order, about 1e-6 here.
TOLERANCE = 1e-4


def _max_diff(ours, reference, mask) -> float:
    return float(np.abs(np.asarray(ours) - reference)[mask.astype(bool)].max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_left_and_right_padding(variant, tmp_path):
    torch_model = make_torch_model(variant)
    torch_model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=jnp.float32)

    for padding in ("left", "right"):
        ids, mask, positions = padded_batch(padding)
        hidden_ref, logits_ref = torch_reference(torch_model, ids, mask, positions)
        # Position ids are left to the model's default (cumsum of the mask) on purpose.
        output = loaded.model(
            jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_logits=True
        )

        assert output.hidden_states.dtype == jnp.float32
        assert _max_diff(output.hidden_states, hidden_ref, mask) <= TOLERANCE, padding
        assert _max_diff(output.logits, logits_ref, mask) <= TOLERANCE, padding


def test_inputs_embeds_match_input_ids(tmp_path):
    make_torch_model("qwen2_qkv_bias").save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=jnp.float32).model
    ids, mask, _ = padded_batch("left")

    from_ids = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    from_embeds = model(
        inputs_embeds=model.embed(jnp.asarray(ids)), attention_mask=jnp.asarray(mask)
    )

    np.testing.assert_array_equal(from_ids.hidden_states, from_embeds.hidden_states)
    assert from_ids.logits is None


def test_loaded_config_matches_variant(tmp_path):
    make_torch_model("qwen2_sliding_layers").save_pretrained(tmp_path)
    config = load_model(tmp_path, dtype=jnp.float32).config

    assert config.model_type == "qwen2"
    assert config.qkv_bias
    assert config.num_kv_heads == 1
    assert config.sliding_windows == (None, 3)


def test_bfloat16_close_to_float32(tmp_path):
    torch_model = make_torch_model("llama_untied_gqa")
    torch_model.save_pretrained(tmp_path)
    ids, mask, positions = padded_batch("left")
    _, logits_ref = torch_reference(torch_model, ids, mask, positions)

    model = load_model(tmp_path).model
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_logits=True).logits

    assert model.layers.q_proj.dtype == jnp.bfloat16
    assert model.layers.attn_norm.dtype == jnp.float32
    # bfloat16 keeps 8 mantissa bits: relative error about 4e-3 per rounding, a few
    # roundings deep here, against logits of magnitude about 1.
    assert _max_diff(logits, logits_ref, mask) <= 5e-2


def test_remat_keeps_outputs_and_gradients(tmp_path):
    make_torch_model("mistral_sliding_window").save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=jnp.float32).model
    ids, mask, _ = padded_batch("left")
    embeds = model.embed(jnp.asarray(ids))

    def loss(embeds):
        hidden = model(inputs_embeds=embeds, attention_mask=jnp.asarray(mask)).hidden_states
        return jnp.sum(hidden[:, -1] ** 2)

    value, grad = jax.value_and_grad(loss)(embeds)
    model.remat = True
    remat_value, remat_grad = jax.value_and_grad(loss)(embeds)

    assert np.isfinite(np.asarray(grad)).all()
    assert float(jnp.abs(grad).max()) > 0
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    # Recomputation fuses float32 ops differently; differences measured up to 2.4e-5.
    np.testing.assert_allclose(remat_grad, grad, rtol=1e-4, atol=1e-4)
