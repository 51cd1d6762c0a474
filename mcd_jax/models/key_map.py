"""The table that maps Hugging Face checkpoint tensors to `Transformer` parameters.

Each `WeightMapping` names a Hugging Face key, the parameter it fills, the shape the
checkpoint must have for a given `ModelConfig`, and how to turn the PyTorch layout into
ours. Per-layer keys contain `{layer}` and fill one slice of a stacked parameter whose
leading axis is the layer. The GGUF loader renames llama.cpp tensors to these keys first
(`GGUF_TO_HF`), so both formats share this table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from mcd_jax.models.config import ModelConfig

Shape = tuple[int, ...]


def _always(config: ModelConfig) -> bool:
    del config
    return True


def _as_is(tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    del config
    return tensor


def _transposed(tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    """nn.Linear [out, in] -> [in, out]."""
    del config
    return tensor.T


def _to_query_heads(tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    """q_proj [heads * head_dim, d] -> [d, heads, head_dim]."""
    return tensor.T.reshape(config.hidden_size, config.num_heads, config.head_dim)


def _to_kv_heads(tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    """k_proj or v_proj [kv_heads * head_dim, d] -> [d, kv_heads, head_dim]."""
    return tensor.T.reshape(config.hidden_size, config.num_kv_heads, config.head_dim)


def _from_query_heads(tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    """o_proj [d, heads * head_dim] -> [heads, head_dim, d]."""
    return tensor.T.reshape(config.num_heads, config.head_dim, config.hidden_size)


def _query_bias(tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    return tensor.reshape(config.num_heads, config.head_dim)


def _kv_bias(tensor: np.ndarray, config: ModelConfig) -> np.ndarray:
    return tensor.reshape(config.num_kv_heads, config.head_dim)


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """One checkpoint tensor (or one per layer) and the parameter it fills.

    Attributes:
      hf_key: the Hugging Face key; `{layer}` stands for the layer index.
      param: the parameter's path in `Transformer`, e.g. ("layers", "q_proj").
      hf_shape: the checkpoint shape the config implies.
      to_param: converts the checkpoint array to the parameter layout (of one layer).
      present: whether the config has this tensor at all.
    """

    hf_key: str
    param: tuple[str, ...]
    hf_shape: Callable[[ModelConfig], Shape]
    to_param: Callable[[np.ndarray, ModelConfig], np.ndarray] = _as_is
    present: Callable[[ModelConfig], bool] = _always

    @property
    def per_layer(self) -> bool:
        """Whether the key repeats for every decoder layer."""
        return "{layer}" in self.hf_key


def _has_qkv_bias(config: ModelConfig) -> bool:
    return config.qkv_bias or config.attention_bias


def _d(c: ModelConfig) -> Shape:
    return (c.hidden_size,)


def _q_rows(c: ModelConfig) -> int:
    return c.num_heads * c.head_dim


def _kv_rows(c: ModelConfig) -> int:
    return c.num_kv_heads * c.head_dim


_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"

WEIGHT_MAPPINGS: tuple[WeightMapping, ...] = (
    WeightMapping("model.embed_tokens.weight", ("embed_tokens",),
                  lambda c: (c.vocab_size, c.hidden_size)),
    WeightMapping("model.norm.weight", ("final_norm",), _d),
    WeightMapping("lm_head.weight", ("lm_head",), lambda c: (c.vocab_size, c.hidden_size),
                  _transposed, present=lambda c: not c.tie_word_embeddings),
    WeightMapping("model.layers.{layer}.input_layernorm.weight", ("layers", "attn_norm"), _d),
    WeightMapping(f"{_ATTN}.q_proj.weight", ("layers", "q_proj"),
                  lambda c: (_q_rows(c), c.hidden_size), _to_query_heads),
    WeightMapping(f"{_ATTN}.k_proj.weight", ("layers", "k_proj"),
                  lambda c: (_kv_rows(c), c.hidden_size), _to_kv_heads),
    WeightMapping(f"{_ATTN}.v_proj.weight", ("layers", "v_proj"),
                  lambda c: (_kv_rows(c), c.hidden_size), _to_kv_heads),
    WeightMapping(f"{_ATTN}.o_proj.weight", ("layers", "o_proj"),
                  lambda c: (c.hidden_size, _q_rows(c)), _from_query_heads),
    WeightMapping(f"{_ATTN}.q_proj.bias", ("layers", "q_bias"), lambda c: (_q_rows(c),),
                  _query_bias, present=_has_qkv_bias),
    WeightMapping(f"{_ATTN}.k_proj.bias", ("layers", "k_bias"), lambda c: (_kv_rows(c),),
                  _kv_bias, present=_has_qkv_bias),
    WeightMapping(f"{_ATTN}.v_proj.bias", ("layers", "v_bias"), lambda c: (_kv_rows(c),),
                  _kv_bias, present=_has_qkv_bias),
    WeightMapping(f"{_ATTN}.o_proj.bias", ("layers", "o_bias"), _d,
                  present=lambda c: c.attention_bias),
    WeightMapping("model.layers.{layer}.post_attention_layernorm.weight",
                  ("layers", "mlp_norm"), _d),
    WeightMapping(f"{_MLP}.gate_proj.weight", ("layers", "gate_proj"),
                  lambda c: (c.intermediate_size, c.hidden_size), _transposed),
    WeightMapping(f"{_MLP}.up_proj.weight", ("layers", "up_proj"),
                  lambda c: (c.intermediate_size, c.hidden_size), _transposed),
    WeightMapping(f"{_MLP}.down_proj.weight", ("layers", "down_proj"),
                  lambda c: (c.hidden_size, c.intermediate_size), _transposed),
    WeightMapping(f"{_MLP}.gate_proj.bias", ("layers", "gate_bias"),
                  lambda c: (c.intermediate_size,), present=lambda c: c.mlp_bias),
    WeightMapping(f"{_MLP}.up_proj.bias", ("layers", "up_bias"),
                  lambda c: (c.intermediate_size,), present=lambda c: c.mlp_bias),
    WeightMapping(f"{_MLP}.down_proj.bias", ("layers", "down_bias"), _d,
                  present=lambda c: c.mlp_bias),
)  # fmt: skip

# Checkpoint keys that carry no parameter and are skipped, because the RoPE frequencies
# are computed from the config: buffers saved by old transformers versions, and the
# Llama 3.1 frequency factors that llama.cpp stores in GGUF files as `rope_freqs.weight`.
IGNORED_KEY_PATTERN = re.compile(
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|rope_freqs\.weight"
)

# llama.cpp tensor names (the `{layer}` part is `blk.N`) -> Hugging Face keys.
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{layer}.attn_norm.weight": "model.layers.{layer}.input_layernorm.weight",
    "blk.{layer}.attn_q.weight": f"{_ATTN}.q_proj.weight",
    "blk.{layer}.attn_k.weight": f"{_ATTN}.k_proj.weight",
    "blk.{layer}.attn_v.weight": f"{_ATTN}.v_proj.weight",
    "blk.{layer}.attn_output.weight": f"{_ATTN}.o_proj.weight",
    "blk.{layer}.attn_q.bias": f"{_ATTN}.q_proj.bias",
    "blk.{layer}.attn_k.bias": f"{_ATTN}.k_proj.bias",
    "blk.{layer}.attn_v.bias": f"{_ATTN}.v_proj.bias",
    "blk.{layer}.attn_output.bias": f"{_ATTN}.o_proj.bias",
    "blk.{layer}.ffn_norm.weight": "model.layers.{layer}.post_attention_layernorm.weight",
    "blk.{layer}.ffn_gate.weight": f"{_MLP}.gate_proj.weight",
    "blk.{layer}.ffn_up.weight": f"{_MLP}.up_proj.weight",
    "blk.{layer}.ffn_down.weight": f"{_MLP}.down_proj.weight",
}


def expected_keys(config: ModelConfig) -> dict[str, tuple[WeightMapping, int | None]]:
    """List every checkpoint key the config needs.

    Args:
      config: the architecture.

    Returns:
      Hugging Face key -> (its mapping, its layer index or None).
    """
    keys: dict[str, tuple[WeightMapping, int | None]] = {}
    for mapping in WEIGHT_MAPPINGS:
        if not mapping.present(config):
            continue
        if mapping.per_layer:
            for layer in range(config.num_layers):
                keys[mapping.hf_key.format(layer=layer)] = (mapping, layer)
        else:
            keys[mapping.hf_key] = (mapping, None)
    return keys


def gguf_name_to_hf(name: str) -> str | None:
    """Translate a llama.cpp tensor name to its Hugging Face key, or None if unknown."""
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match is None:
        return GGUF_TO_HF.get(name)
    template = GGUF_TO_HF.get("blk.{layer}." + match.group(2))
    return None if template is None else template.format(layer=int(match.group(1)))
