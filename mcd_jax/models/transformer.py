"""A frozen decoder-only transformer (Llama, Mistral, Qwen2) in Flax NNX.

The module reproduces the Hugging Face PyTorch models numerically (tests compare hidden
states and logits to transformers 5.25 at 1e-4 in float32). It has no notion of soft
prompts: callers splice their own vectors into `inputs_embeds`.

Layout choices:
  * Decoder layers are stacked: every layer parameter has a leading `layers` axis and the
    forward pass is one `jax.lax.scan`, so compile time does not grow with depth and the
    KV cache is one array per keys/values.
  * Matrices are stored in `dtype` (bfloat16 by default). RMSNorm weights and biases are
    float32. The residual stream, norms, RoPE and softmax run in float32.
  * Every parameter carries `logical_axes` metadata (e.g. ("vocab", "embed")), which
    `mcd_jax.sharding` maps to mesh axes.

Note: logical axes are kept in our own `logical_axes` metadata rather than flax's
`out_sharding`, because flax 0.12 shards variables with `out_sharding` eagerly at
creation and then requires a mesh whose axis names are the logical names.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcd_jax.models.config import ModelConfig

# A window longer than any sequence: the per-layer value for full attention.
_NO_WINDOW = np.iinfo(np.int32).max // 2


@flax.struct.dataclass
class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Prompts are left-padded, so all rows write their new tokens at the same slots and one
    shared `index` is enough.

    Attributes:
      keys: [layers, batch, max_len, kv_heads, head_dim] keys after RoPE.
      values: [layers, batch, max_len, kv_heads, head_dim].
      index: int32 scalar, the first slot the next call writes to.
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        """Number of slots per row."""
        return self.keys.shape[2]


@flax.struct.dataclass
class TransformerOutput:
    """The output of `Transformer.__call__`.

    Attributes:
      hidden_states: [batch, seq, d] float32, the output of the final RMSNorm.
      logits: [batch, seq, vocab] float32, or None unless `return_logits=True`.
      cache: the updated KV cache, or None when the call had none.
    """

    hidden_states: jax.Array
    logits: jax.Array | None = None
    cache: KVCache | None = None


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, axes: tuple[str, ...]) -> nnx.Param:
    """Make a normal(0, 0.02) matrix parameter with logical axis names."""
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _vector(shape: tuple[int, ...], fill: float, axes: tuple[str, ...]) -> nnx.Param:
    """Make a float32 norm weight or bias parameter filled with `fill`."""
    return nnx.Param(jnp.full(shape, fill, jnp.float32), logical_axes=axes)


class DecoderLayers(nnx.Module):
    """The parameters of all decoder layers, stacked on a leading `layers` axis."""

    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        layers, d, mlp = config.num_layers, config.hidden_size, config.intermediate_size
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim

        self.attn_norm = _vector((layers, d), 1.0, ("layers", "norm"))
        self.q_proj = _param(rngs, (layers, d, heads, head_dim), dtype,
                             ("layers", "embed", "heads", "head_dim"))  # fmt: skip
        self.k_proj = _param(rngs, (layers, d, kv_heads, head_dim), dtype,
                             ("layers", "embed", "kv_heads", "head_dim"))  # fmt: skip
        self.v_proj = _param(rngs, (layers, d, kv_heads, head_dim), dtype,
                             ("layers", "embed", "kv_heads", "head_dim"))  # fmt: skip
        self.o_proj = _param(rngs, (layers, heads, head_dim, d), dtype,
                             ("layers", "heads", "head_dim", "embed"))  # fmt: skip
        if config.qkv_bias or config.attention_bias:
            self.q_bias = _vector((layers, heads, head_dim), 0.0, ("layers", "heads", "head_dim"))
            self.k_bias = _vector((layers, kv_heads, head_dim), 0.0,
                                  ("layers", "kv_heads", "head_dim"))  # fmt: skip
            self.v_bias = _vector((layers, kv_heads, head_dim), 0.0,
                                  ("layers", "kv_heads", "head_dim"))  # fmt: skip
        if config.attention_bias:
            self.o_bias = _vector((layers, d), 0.0, ("layers", "norm"))

        self.mlp_norm = _vector((layers, d), 1.0, ("layers", "norm"))
        self.gate_proj = _param(rngs, (layers, d, mlp), dtype, ("layers", "embed", "mlp"))
        self.up_proj = _param(rngs, (layers, d, mlp), dtype, ("layers", "embed", "mlp"))
        self.down_proj = _param(rngs, (layers, mlp, d), dtype, ("layers", "mlp", "embed"))
        if config.mlp_bias:
            self.gate_bias = _vector((layers, mlp), 0.0, ("layers", "mlp"))
            self.up_bias = _vector((layers, mlp), 0.0, ("layers", "mlp"))
            self.down_bias = _vector((layers, d), 0.0, ("layers", "norm"))

    def arrays(self) -> dict[str, jax.Array]:
        """Return the stacked parameter arrays by name, for `jax.lax.scan`."""
        return {
            name: value[...] for name, value in vars(self).items() if isinstance(value, nnx.Param)
        }


class Transformer(nnx.Module):
    """Decoder-only Llama/Mistral/Qwen2 transformer with an optional KV cache.

    Attributes:
      config: the architecture.
      dtype: storage dtype of the weight matrices; matmuls take inputs in this dtype and
        accumulate in float32.
      remat: whether to rematerialise each layer's activations in the backward pass.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.bfloat16,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        d, vocab = config.hidden_size, config.vocab_size

        self.embed_tokens = _param(rngs, (vocab, d), dtype, ("vocab", "embed"))
        self.layers = DecoderLayers(config, dtype, rngs)
        self.final_norm = _vector((d,), 1.0, ("norm",))
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (d, vocab), dtype, ("embed", "vocab"))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Look up token embeddings.

        Args:
          input_ids: [batch, seq] int token ids.

        Returns:
          [batch, seq, d] float32 embeddings.
        """
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(jnp.float32)

    def compute_logits(self, hidden_states: jax.Array) -> jax.Array:
        """Apply the LM head.

        Args:
          hidden_states: [..., d] final-norm outputs.

        Returns:
          [..., vocab] float32 logits.
        """
        if self.config.tie_word_embeddings:
            weight = self.embed_tokens[...].T
        else:
            weight = self.lm_head[...]
        return _matmul(hidden_states, weight, self.dtype)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """Allocate an empty KV cache.

        Args:
          batch: number of rows.
          max_len: number of slots per row (prompt plus generated tokens).
          dtype: storage dtype of keys and values; defaults to the weight dtype.

        Returns:
          A cache with zeroed keys/values and index 0.
        """
        config = self.config
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return KVCache(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            index=jnp.zeros((), jnp.int32),
        )

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> TransformerOutput:
        """Run the decoder.

        Args:
          input_ids: [batch, seq] token ids; give this or `inputs_embeds`, not both.
          inputs_embeds: [batch, seq, d] input vectors (e.g. with a soft prompt spliced in).
          attention_mask: 1 for a real token, 0 for padding. Without a cache it is
            [batch, seq] (left or right padding). With a cache it is [batch, max_len] and
            covers every cache slot, including the `seq` slots this call writes. Defaults
            to all ones.
          position_ids: [batch, seq] RoPE positions. Defaults to `cumsum(mask) - 1`
            clipped at 0, read at this call's slots, which numbers the real tokens of a
            left-padded row from 0.
          cache: a KV cache; this call writes its keys/values at slots
            `cache.index .. cache.index + seq - 1` and attends to all earlier slots.
            The caller must keep `cache.index + seq <= max_len`, because
            `jax.lax.dynamic_update_slice` clamps writes past the end.
          return_logits: also compute the LM head.

        Returns:
          A `TransformerOutput` with the hidden states, the logits if asked for, and the
          updated cache.

        Raises:
          ValueError: both or neither of `input_ids`/`inputs_embeds`, or a mask or
            position shape that does not match.
        """
        hidden = self._input_vectors(input_ids, inputs_embeds)
        batch, seq, _ = hidden.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        kv_len = seq if cache is None else cache.max_len
        key_mask = _key_mask(attention_mask, batch, kv_len, cache is not None)
        query_slots = start + jnp.arange(seq, dtype=jnp.int32)

        if position_ids is None:
            all_positions = jnp.maximum(jnp.cumsum(key_mask, axis=-1, dtype=jnp.int32) - 1, 0)
            position_ids = jax.lax.dynamic_slice_in_dim(all_positions, start, seq, axis=1)
        elif position_ids.shape != (batch, seq):
            raise ValueError(
                f"position_ids has shape {position_ids.shape}; expected (batch, seq) = "
                f"{(batch, seq)}."
            )
        cos, sin = _rope_tables(position_ids, self.config.rope_inverse_frequencies())

        # [batch, seq, kv_len]: which slots each query may see, before any sliding window.
        allowed = key_mask[:, None, :] & (
            jnp.arange(kv_len, dtype=jnp.int32)[None, None, :] <= query_slots[None, :, None]
        )
        hidden, cache = self._run_layers(hidden, cos, sin, allowed, query_slots, cache)

        hidden = _rms_norm(hidden, self.final_norm[...], self.config.rms_norm_eps)
        logits = self.compute_logits(hidden) if return_logits else None
        return TransformerOutput(hidden_states=hidden, logits=logits, cache=cache)

    def _input_vectors(
        self, input_ids: jax.Array | None, inputs_embeds: jax.Array | None
    ) -> jax.Array:
        """Return the float32 [batch, seq, d] input of the first layer."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds.")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids has shape {input_ids.shape}; expected [batch, seq].")
            return self.embed(input_ids)
        d = self.config.hidden_size
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != d:
            raise ValueError(
                f"inputs_embeds has shape {inputs_embeds.shape}; expected [batch, seq, {d}]."
            )
        return inputs_embeds.astype(jnp.float32)

    def _run_layers(
        self,
        hidden: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        allowed: jax.Array,
        query_slots: jax.Array,
        cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Scan the stacked decoder layers over the residual stream [batch, seq, d]."""
        config, dtype = self.config, self.dtype
        windows = jnp.asarray(
            [_NO_WINDOW if w is None else w for w in config.sliding_windows], jnp.int32
        )
        kv_len = allowed.shape[-1]
        distance = query_slots[:, None] - jnp.arange(kv_len, dtype=jnp.int32)[None, :]

        def layer(carry, per_layer):
            params, window, layer_keys, layer_values = per_layer
            mask = allowed & (distance < window)[None]
            layer_cache = None
            if cache is not None:
                layer_cache = (layer_keys, layer_values, cache.index)
            carry, new_keys, new_values = _decoder_layer(
                params, carry, cos, sin, mask, layer_cache, config, dtype
            )
            return carry, (new_keys, new_values)

        if self.remat:
            layer = jax.checkpoint(layer)
        cached = (cache.keys, cache.values) if cache is not None else (None, None)
        hidden, (keys, values) = jax.lax.scan(
            layer, hidden, (self.layers.arrays(), windows, *cached)
        )
        if cache is None:
            return hidden, None
        new_index = cache.index + hidden.shape[1]
        return hidden, KVCache(keys=keys, values=values, index=new_index)


def _key_mask(
    attention_mask: jax.Array | None, batch: int, kv_len: int, has_cache: bool
) -> jax.Array:
    """Return the boolean [batch, kv_len] mask of real tokens."""
    if attention_mask is None:
        return jnp.ones((batch, kv_len), jnp.bool_)
    if attention_mask.shape != (batch, kv_len):
        expected = "(batch, max_len) of the cache" if has_cache else "(batch, seq)"
        raise ValueError(
            f"attention_mask has shape {attention_mask.shape}; expected {expected} = "
            f"{(batch, kv_len)}."
        )
    return attention_mask.astype(jnp.bool_)


def _precision(dtype: Any) -> jax.lax.Precision:
    """Ask for full float32 products when the weights are float32.

    GPUs (TF32) and TPUs (one bfloat16 pass) otherwise round float32 matmul inputs by
    default, which would break float32 parity with PyTorch. bfloat16 inputs are exact in
    one pass, so they keep the default.
    """
    # NOTE: only the CPU backend has been run here, where both settings give float32.
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def _einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """Contract two operands in `dtype`, accumulating and returning float32.

    For bfloat16 `dtype` the backward pass also multiplies in bfloat16 with float32
    accumulation (see `_low_precision_einsum`); float32 keeps plain autodiff, so float32
    gradients stay exact.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(
            spec, a.astype(dtype), b.astype(dtype),
            precision=_precision(dtype), preferred_element_type=jnp.float32,
        )  # fmt: skip
    return _low_precision_einsum(spec, jnp.dtype(dtype).name, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_einsum(spec: str, dtype: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Contract two operands cast to `dtype`, in the forward and in the backward pass.

    Plain autodiff of a bfloat16 x bfloat16 -> float32 einsum gets a float32 cotangent, so
    XLA casts the bfloat16 weights to float32 for both backward products. Measured on the
    2-core x86 CPU these tests run on (JAX 0.10.2), float32 products run at about half the
    bfloat16 -> float32 rate. Casting the cotangent to bfloat16 keeps the backward pass on
    the fast path, as mixed-precision training usually does. Every index must appear in at
    least two of the three terms, which holds for all products of this model.
    """
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _low_precision_einsum_forward(spec, dtype, a, b):
    return _low_precision_einsum(spec, dtype, a, b), (a, b)


def _low_precision_einsum_backward(spec, dtype, residuals, cotangent):
    a, b = residuals
    inputs, output = spec.split("->")
    spec_a, spec_b = inputs.split(",")
    cotangent = cotangent.astype(dtype)
    grad_a = jnp.einsum(
        f"{output},{spec_b}->{spec_a}", cotangent, b.astype(dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    grad_b = jnp.einsum(
        f"{spec_a},{output}->{spec_b}", a.astype(dtype), cotangent,
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_forward, _low_precision_einsum_backward)


def _matmul(x: jax.Array, weight: jax.Array, dtype: Any) -> jax.Array:
    """Contract the last axis of `x` with the first of `weight`, accumulating in float32.

    Measured with JAX 0.10.2 on a 2-core x86 CPU, jitted 2048^2 matmuls: bfloat16 inputs
    with float32 output ran at 115 GFLOP/s, float32 at 54 and bfloat16 with bfloat16 output
    at 50. So bfloat16 weights take bfloat16 inputs and `preferred_element_type=float32`.
    """
    return _einsum("...k,kn->...n", x, weight, dtype)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32 over the last axis."""
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return weight * (x * jax.lax.rsqrt(variance + eps))


def _rope_tables(position_ids: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Return cos and sin [batch, seq, 1, head_dim] in the Hugging Face half-split layout."""
    angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate [batch, seq, heads, head_dim] by RoPE, pairing dimension i with i + head_dim / 2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _project_heads(x: jax.Array, weight: jax.Array, bias: jax.Array | None, dtype: Any):
    """[batch, seq, d] x [d, heads, head_dim] -> [batch, seq, heads, head_dim] float32."""
    out = _einsum("bsd,dnh->bsnh", x, weight, dtype)
    return out if bias is None else out + bias


def _attention(
    query: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, dtype: Any
) -> jax.Array:
    """Grouped-query attention.

    Args:
      query: [batch, seq, heads, head_dim] float32.
      keys: [batch, kv_len, kv_heads, head_dim].
      values: [batch, kv_len, kv_heads, head_dim].
      mask: [batch, seq, kv_len] bool, True where a query may attend.
      dtype: the dtype the two matmuls take their inputs in.

    Returns:
      [batch, seq, heads, head_dim] float32.
    """
    batch, seq, heads, head_dim = query.shape
    kv_heads = keys.shape[2]
    query = query.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = _einsum("bskgh,btkh->bkgst", query, keys, dtype) * (head_dim**-0.5)

    # A finite minimum, as transformers' eager attention uses: a fully masked row (a padding
    # query) gets uniform weights instead of NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = _einsum("bkgst,btkh->bskgh", probs, values, dtype)
    return out.reshape(batch, seq, heads, head_dim)


def _decoder_layer(
    params: dict[str, jax.Array],
    hidden: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
    layer_cache: tuple[jax.Array, jax.Array, jax.Array] | None,
    config: ModelConfig,
    dtype: Any,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Run one pre-norm decoder layer on [batch, seq, d]; return it and the layer's cache."""
    normed = _rms_norm(hidden, params["attn_norm"], config.rms_norm_eps)
    query = _project_heads(normed, params["q_proj"], params.get("q_bias"), dtype)
    keys = _project_heads(normed, params["k_proj"], params.get("k_bias"), dtype)
    values = _project_heads(normed, params["v_proj"], params.get("v_bias"), dtype)
    query = _apply_rope(query, cos, sin)
    keys = _apply_rope(keys, cos, sin)

    new_keys = new_values = None
    if layer_cache is not None:
        cached_keys, cached_values, index = layer_cache
        start = (0, index, 0, 0)
        new_keys = jax.lax.dynamic_update_slice(cached_keys, keys.astype(cached_keys.dtype), start)
        new_values = jax.lax.dynamic_update_slice(
            cached_values, values.astype(cached_values.dtype), start
        )
        keys, values = new_keys, new_values

    attended = _attention(query, keys, values, mask, dtype)
    attn_out = _einsum("bsnh,nhd->bsd", attended, params["o_proj"], dtype)
    if "o_bias" in params:
        attn_out = attn_out + params["o_bias"]
    hidden = hidden + attn_out

    normed = _rms_norm(hidden, params["mlp_norm"], config.rms_norm_eps)
    gate = _matmul(normed, params["gate_proj"], dtype)
    up = _matmul(normed, params["up_proj"], dtype)
    if "gate_bias" in params:
        gate, up = gate + params["gate_bias"], up + params["up_bias"]
    down = _matmul(jax.nn.silu(gate) * up, params["down_proj"], dtype)
    if "down_bias" in params:
        down = down + params["down_bias"]
    return hidden + down, new_keys, new_values
