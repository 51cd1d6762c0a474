"""ModelConfig.from_hf_config on config.json dicts in the current and older layouts."""

import numpy as np
import pytest
import torch
import transformers

from mcd_jax.models import ModelConfig

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    vocab_size=100,
)


def _hf_inverse_frequencies(config: transformers.PretrainedConfig) -> np.ndarray:
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    return rotary.inv_freq.numpy()


def test_rope_theta_top_level_and_rope_parameters():
    top_level = ModelConfig.from_hf_config({"model_type": "llama", "rope_theta": 500.0, **BASE})
    nested = ModelConfig.from_hf_config(
        {"model_type": "llama", "rope_parameters": {"rope_theta": 700.0}, **BASE}
    )
    absent = ModelConfig.from_hf_config({"model_type": "llama", **BASE})

    assert top_level.rope_theta == 500.0
    assert nested.rope_theta == 700.0
    assert absent.rope_theta == 10000.0


def test_legacy_rope_scaling_type_key():
    config = ModelConfig.from_hf_config(
        {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}, **BASE}
    )

    assert config.rope_scaling.rope_type == "linear"
    assert config.rope_scaling.factor == 2.0


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=["default", "linear", "llama3"],
)
def test_inverse_frequencies_match_transformers(rope_scaling):
    hf_config = transformers.LlamaConfig(**BASE, rope_theta=5000.0, rope_scaling=rope_scaling)
    config = ModelConfig.from_hf_config(hf_config.to_dict())

    with torch.no_grad():
        expected = _hf_inverse_frequencies(hf_config)
    np.testing.assert_allclose(config.rope_inverse_frequencies(), expected, rtol=1e-6)


def test_unsupported_rope_type():
    hf_config = {"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}

    expected = r"unsupported RoPE scaling type 'yarn'; supported types: default, linear, llama3"
    with pytest.raises(ValueError, match=expected):
        ModelConfig.from_hf_config({**hf_config, **BASE})


def test_unknown_model_type():
    expected = r"unsupported model_type 'gemma'; supported model types: llama, mistral, qwen2"
    with pytest.raises(ValueError, match=expected):
        ModelConfig.from_hf_config({"model_type": "gemma", **BASE})


def test_missing_required_key():
    hf_config = {"model_type": "mistral", **BASE}
    del hf_config["num_hidden_layers"]

    with pytest.raises(ValueError, match=r"config.json has no 'num_hidden_layers'"):
        ModelConfig.from_hf_config(hf_config)


def test_unsupported_activation():
    with pytest.raises(ValueError, match=r"unsupported hidden_act 'gelu'; only 'silu'"):
        ModelConfig.from_hf_config({"model_type": "llama", "hidden_act": "gelu", **BASE})


def test_head_dim_default_and_explicit():
    default = ModelConfig.from_hf_config({"model_type": "llama", **BASE})
    explicit = ModelConfig.from_hf_config({"model_type": "llama", "head_dim": 32, **BASE})

    assert default.head_dim == 16
    assert explicit.head_dim == 32


def test_gqa_and_token_ids():
    config = ModelConfig.from_hf_config(
        {
            "model_type": "llama",
            "num_key_value_heads": 2,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128009],
            **BASE,
        }
    )

    assert config.num_kv_heads == 2
    assert config.bos_token_id == 128000
    assert config.eos_token_ids == (128001, 128009)


def test_mistral_window_on_every_layer():
    config = ModelConfig.from_hf_config({"model_type": "mistral", "sliding_window": 8, **BASE})

    assert config.sliding_windows == (8, 8, 8, 8)
    assert not config.qkv_bias


def test_qwen2_window_only_when_enabled():
    off = ModelConfig.from_hf_config({"model_type": "qwen2", "sliding_window": 8, **BASE})
    on = ModelConfig.from_hf_config(
        {
            "model_type": "qwen2",
            "sliding_window": 8,
            "use_sliding_window": True,
            "max_window_layers": 2,
            **BASE,
        }
    )

    assert off.sliding_windows == (None, None, None, None)
    assert on.sliding_windows == (None, None, 8, 8)
    assert on.qkv_bias


def test_qwen2_layer_types_match_transformers():
    hf_config = transformers.Qwen2Config(
        **BASE,
        num_key_value_heads=4,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    config = ModelConfig.from_hf_config(hf_config.to_dict())

    expected = tuple(8 if kind == "sliding_attention" else None for kind in hf_config.layer_types)
    assert config.sliding_windows == expected


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not a multiple of "):
        ModelConfig.from_hf_config({"model_type": "llama", "num_key_value_heads": 3, **BASE})
