"""Tiny random transformers models saved to disk, and batches to compare them on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

# Each variant is a config class and its keyword arguments; all share the small sizes below.
_SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=101,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

VARIANTS: dict[str, tuple[type, dict]] = {
    "llama_tied_mha": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "llama_untied_gqa": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500.0),
    ),
    "llama_biases_head_dim": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=8),
    ),
    "llama3_rope_scaling": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "linear_rope_scaling": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, rope_scaling=dict(rope_type="linear", factor=3.0)),
    ),
    "mistral_sliding_window": (
        transformers.MistralConfig,
        dict(num_key_value_heads=2, sliding_window=4),
    ),
    "qwen2_qkv_bias": (
        transformers.Qwen2Config,
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen2_sliding_layers": (
        transformers.Qwen2Config,
        dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ),
}


def make_torch_model(variant: str, seed: int = 0, **size_overrides) -> transformers.PreTrainedModel:
    """Build a float32 random model whose every weight, biases included, is non-trivial.

    `size_overrides` replace entries of the shared sizes, e.g. a tokenizer's `vocab_size`.
    """
    config_class, kwargs = VARIANTS[variant]
    config = config_class(**{**_SIZES, **size_overrides}, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomize_weights(model)


def randomize_weights(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """Draw every weight from N(0, 0.08), norms around 1, so no term is trivially zero."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.08)
            if "norm" in name:
                parameter.add_(1.0)
    return model.eval()


def save_torch_model(model: transformers.PreTrainedModel, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def padded_batch(padding: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return input ids, attention mask and position ids [3, 12] with padding on one side.

    Row 0 has 5 padding tokens, row 1 none, row 2 one. Positions count real tokens from 0.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, _SIZES["vocab_size"], size=(3, 12))
    mask = np.ones((3, 12), np.int64)
    for row, pads in ((0, 5), (2, 1)):
        if padding == "left":
            mask[row, :pads] = 0
        else:
            mask[row, 12 - pads :] = 0
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    return ids, mask, positions


def torch_reference(model, ids, mask, positions) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states and logits of the PyTorch model, as float32 NumPy arrays."""
    with torch.no_grad():
        output = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
            output_hidden_states=True,
        )
    return output.hidden_states[-1].numpy(), output.logits.numpy()
