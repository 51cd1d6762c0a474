"""The architecture of a decoder-only chat model, read from a Hugging Face `config.json`.

One frozen dataclass covers the Llama family (Llama 2, Llama 3/3.1, Vicuna, SmolLM2),
Mistral and Qwen2, because they differ only in a few switches: QKV bias (Qwen2), a sliding
attention window (Mistral, optionally Qwen2) and the RoPE frequency scaling (Llama 3.1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Used by transformers 5.25 when a config names no rope_theta (`default_theta` of
# LlamaConfig, MistralConfig and Qwen2Config).
_DEFAULT_ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in transformers' `rope_parameters`.

    Attributes:
      rope_type: "default" (none), "linear" (all frequencies divided by `factor`) or
        "llama3" (Llama 3.1: low frequencies divided by `factor`, high ones kept,
        a smooth blend between).
      factor: the divisor for "linear" and "llama3".
      low_freq_factor: "llama3" only.
      high_freq_factor: "llama3" only.
      original_max_position_embeddings: "llama3" only; the pretraining context length.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters of a Llama, Mistral or Qwen2 decoder.

    Attributes:
      model_type: "llama", "mistral" or "qwen2".
      vocab_size: number of token embeddings.
      hidden_size: model dimension `d`.
      intermediate_size: inner dimension of the gated MLP.
      num_layers: number of decoder layers.
      num_heads: number of query heads.
      num_kv_heads: number of key/value heads (grouped-query attention when fewer).
      head_dim: size of one attention head; `hidden_size // num_heads` unless set.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base wavelength.
      rope_scaling: RoPE frequency scaling.
      max_position_embeddings: context length the model was configured for.
      tie_word_embeddings: whether the LM head reuses the token embedding matrix.
      attention_bias: bias on the q, k, v and o projections (Llama `attention_bias`).
      qkv_bias: bias on the q, k and v projections only (always on for Qwen2).
      mlp_bias: bias on the gate, up and down projections (Llama `mlp_bias`).
      sliding_windows: per layer, the attention window in tokens, or None for full
        attention. A key at slot j is visible from a query at slot i when
        `i - window < j <= i`.
      bos_token_id: beginning-of-sequence token id, if any.
      eos_token_ids: end-of-sequence token ids (several for Llama 3 chat models).
      pad_token_id: padding token id, if any.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; grouped-query attention needs it to be."
            )
        if len(self.sliding_windows) not in (0, self.num_layers):
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for "
                f"{self.num_layers} layers; give one per layer or none."
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)

    @property
    def uses_sliding_window(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return any(window is not None for window in self.sliding_windows)

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any]) -> ModelConfig:
        """Build a config from the dict of a Hugging Face `config.json`.

        Both the transformers 5 layout (`rope_parameters`) and the older one
        (top-level `rope_theta`, `rope_scaling`) are read.

        Args:
          hf_config: the parsed `config.json`.

        Returns:
          The matching `ModelConfig`.

        Raises:
          ValueError: the model type, activation or RoPE type is not supported, or a
            required key is missing.
        """
        model_type = hf_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        activation = hf_config.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"unsupported hidden_act {activation!r}; only 'silu' is implemented.")

        num_heads = _required(hf_config, "num_attention_heads")
        hidden_size = _required(hf_config, "hidden_size")
        num_layers = _required(hf_config, "num_hidden_layers")
        rope_theta, rope_scaling = _read_rope(hf_config)
        is_qwen2 = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=_required(hf_config, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_required(hf_config, "intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
            head_dim=hf_config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            attention_bias=bool(hf_config.get("attention_bias", False)) and not is_qwen2,
            qkv_bias=is_qwen2,
            mlp_bias=bool(hf_config.get("mlp_bias", False)),
            sliding_windows=_read_sliding_windows(hf_config, model_type, num_layers),
            bos_token_id=hf_config.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(hf_config.get("eos_token_id")),
            pad_token_id=_first_id(hf_config.get("pad_token_id")),
        )

    def rope_inverse_frequencies(self) -> np.ndarray:
        """Compute the RoPE inverse frequencies, scaled as transformers 5.25 does.

        Returns:
          float32 array [head_dim // 2].
        """
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim
        inv_freq = (1.0 / (self.rope_theta**exponents)).astype(np.float32)
        scaling = self.rope_scaling
        if scaling.rope_type == "linear":
            return (inv_freq / scaling.factor).astype(np.float32)
        if scaling.rope_type == "llama3":
            return _llama3_scaled(inv_freq, scaling)
        return inv_freq


def _llama3_scaled(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Apply Llama 3.1 frequency scaling (transformers `_compute_llama3_parameters`)."""
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq

    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _required(hf_config: Mapping[str, Any], key: str) -> Any:
    if hf_config.get(key) is None:
        raise ValueError(f"config.json has no {key!r}; a {hf_config.get('model_type')} needs it.")
    return hf_config[key]


def _read_rope(hf_config: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    """Read rope_theta and the scaling from `rope_parameters` or the older keys."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    legacy_scaling = hf_config.get("rope_scaling") or {}
    for key, value in legacy_scaling.items():
        parameters.setdefault(key, value)
    theta = parameters.get("rope_theta", hf_config.get("rope_theta", _DEFAULT_ROPE_THETA))

    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE scaling type {rope_type!r}; supported types: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    if rope_type == "default":
        return float(theta), RopeScaling()
    if "factor" not in parameters:
        raise ValueError(f"RoPE scaling type {rope_type!r} needs a 'factor'; config.json has none.")
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(parameters["factor"]),
        low_freq_factor=float(parameters.get("low_freq_factor", 1.0)),
        high_freq_factor=float(parameters.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            parameters.get(
                "original_max_position_embeddings",
                hf_config.get("max_position_embeddings", 8192),
            )
        ),
    )
    return float(theta), scaling


def _read_sliding_windows(
    hf_config: Mapping[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, ...]:
    """Give each layer its window the way transformers 5.25 builds `layer_types`."""
    window = hf_config.get("sliding_window")
    if model_type == "llama" or window is None:
        return (None,) * num_layers
    if model_type == "mistral":
        return (int(window),) * num_layers

    # Qwen2: the window is off unless use_sliding_window, then applies to the layers that
    # `layer_types` marks, by default those at index >= max_window_layers.
    if not hf_config.get("use_sliding_window", False):
        return (None,) * num_layers
    layer_types = hf_config.get("layer_types")
    if layer_types is None:
        first_windowed = hf_config.get("max_window_layers", 28)
        layer_types = [
            "sliding_attention" if i >= first_windowed else "full_attention"
            for i in range(num_layers)
        ]
    return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _first_id(value: int | list[int] | None) -> int | None:
    ids = _as_id_tuple(value)
    return ids[0] if ids else None
