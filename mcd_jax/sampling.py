"""Next-token selection for generation: greedy, temperature, top-k and top-p.

The filters follow the order and rules of Hugging Face's logits warpers
(temperature, then top-k, then top-p, each keeping at least one token), so a
sampled run means the same thing here as with `transformers.generate`. The
random draws differ, since JAX and PyTorch use different generators.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; frozen and hashable so jit can treat it as static.

    Attributes:
      max_new_tokens: the maximum number of tokens generated per row.
      min_new_tokens: stop tokens are blocked until this many were generated.
      temperature: 0 means greedy decoding; otherwise logits are divided by it.
      top_k: keep only the k most likely tokens; 0 keeps all.
      top_p: keep the smallest set of tokens whose probability reaches top_p.
      seed: the PRNG seed for sampling; the same seed gives the same tokens.
      stop_token_ids: tokens that end a row (EOS and any extra stop ids).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Apply temperature, top-k and top-p to logits `[batch, vocab]` (float32)."""
    logits = logits / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, logits.shape[-1])
        kth_largest = jax.lax.top_k(logits, k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if config.top_p < 1.0:
        logits = _filter_top_p(logits, config.top_p)
    return logits


def _filter_top_p(logits: jax.Array, top_p: float) -> jax.Array:
    """Drop the least likely tokens whose total probability is at most 1 - top_p."""
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = cumulative <= (1.0 - top_p)
    removed = removed.at[:, -1].set(False)  # The most likely token always stays.
    # The smallest kept logit is the threshold: everything below it goes.
    threshold = jnp.min(jnp.where(removed, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def select_next_tokens(
    logits: jax.Array,
    num_generated: jax.Array,
    rng: jax.Array,
    config: SamplingConfig,
) -> jax.Array:
    """Choose one token per row.

    Args:
      logits: `[batch, vocab]` float32 logits of the last position.
      num_generated: int32 scalar, how many tokens each row has generated so far.
      rng: a PRNG key, used only when sampling.
      config: the decoding settings.

    Returns:
      `[batch]` int32 token ids.
    """
    if config.min_new_tokens > 0 and config.stop_token_ids:
        stop_ids = jnp.asarray(config.stop_token_ids, dtype=jnp.int32)
        blocked = (num_generated < config.min_new_tokens) & jnp.isin(
            jnp.arange(logits.shape[-1]), stop_ids
        )
        logits = jnp.where(blocked[None, :], -jnp.inf, logits)
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, config)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
