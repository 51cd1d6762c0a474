"""The soft prompt: its initialisation from a text prompt and its splicing into embeddings.

The soft prompt is one float32 array of shape [P, d]. It starts as the input
embeddings of the text prompt's tokens as they appear inside the chat
template's system slot, so that before training the soft-prompt input is the
text-prompt input exactly. `splice_soft_prompt` writes it over the placeholder
embeddings at the slot positions that `mcd_jax.chat.format_chat_batch` returns.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcd_jax import chat

# Any query works because the slot's tokens come from the system text alone:
# split_at_system_slot rejects tokenizations that merge across the slot's edges.
_PROBE_QUERY = "How do I bake bread?"


def text_prompt_token_ids(
    tokenizer: Any, text_prompt: str, placement: str = "system_slot"
) -> list[int]:
    """Tokenize a text prompt the way it is tokenized where the soft prompt goes.

    For `placement="system_slot"` the ids are the tokens covering the text
    prompt inside the rendered chat template, found by rendering it with the
    text prompt and with sentinels and taking the differing span. Spliced into
    `format_chat_batch(..., soft_prompt_length=len(ids))`, they give exactly
    the ids of `format_chat_batch(..., text_prompt=text_prompt)`.

    For `placement="prefix"` the text prompt is tokenized on its own with the
    tokenizer's special tokens. A leading token is dropped only if it is the
    BOS token, because the chat text after the prefix carries its own BOS when
    the template writes one. Qwen2.5's tokenizer adds no BOS, so nothing is
    dropped there.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      text_prompt: the text prompt, e.g. the default safety prompt.
      placement: "system_slot" or "prefix", as in `format_chat_batch`.

    Returns:
      The token ids, at least one.

    Raises:
      ValueError: an empty text prompt, an unknown placement, or a template
        without a usable system slot.
    """
    if not isinstance(text_prompt, str) or not text_prompt.strip():
        raise ValueError(f"text_prompt={text_prompt!r} is empty; give the text to initialise from.")
    if placement not in chat.PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not one of {chat.PLACEMENTS}.")

    if placement == "system_slot":
        return chat.split_at_system_slot(tokenizer, _PROBE_QUERY, text_prompt).slot

    ids = list(tokenizer(text_prompt)["input_ids"])
    if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"text_prompt={text_prompt!r} has no tokens besides BOS.")
    return ids


def init_soft_prompt(embedding_table: jax.Array | np.ndarray, token_ids: list[int]) -> jax.Array:
    """Initialise a soft prompt from the embedding rows of some token ids.

    Args:
      embedding_table: [vocab, d] the frozen model's input embeddings.
      token_ids: P ids, e.g. from `text_prompt_token_ids`.

    Returns:
      [P, d] float32 copy of the rows.

    Raises:
      ValueError: the table is not 2-D, `token_ids` is empty, or an id is
        outside [0, vocab).
    """
    if np.ndim(embedding_table) != 2:
        raise ValueError(
            f"embedding_table has shape {np.shape(embedding_table)}; expected [vocab, d]."
        )
    vocab = np.shape(embedding_table)[0]
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids={token_ids!r} must be a non-empty list of ints.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids has dtype {ids.dtype}; expected integer ids.")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(
            f"token_ids contain {int(ids.min())}..{int(ids.max())}, outside the embedding "
            f"table's vocabulary [0, {vocab}); use ids from the model's own tokenizer."
        )
    return jnp.asarray(embedding_table)[ids].astype(jnp.float32)


def check_soft_prompt(soft_prompt: jax.Array | np.ndarray, hidden_size: int) -> None:
    """Check a soft prompt's rank, width and values on the host.

    Call it on concrete arrays (at load or init time), not inside `jit`.

    Args:
      soft_prompt: [P, d] the soft prompt.
      hidden_size: d, the model's hidden size.

    Raises:
      ValueError: wrong rank, a width other than `hidden_size`, no rows, or
        NaN/inf values.
    """
    shape = np.shape(soft_prompt)
    if len(shape) != 2:
        raise ValueError(f"The soft prompt has shape {shape}; expected [P, d] (2-D).")
    if shape[0] < 1:
        raise ValueError(f"The soft prompt has shape {shape}; it needs at least one row.")
    if shape[1] != hidden_size:
        raise ValueError(
            f"The soft prompt has width {shape[1]} but the model's hidden size is {hidden_size}; "
            "it was trained for another model."
        )
    finite = np.isfinite(np.asarray(soft_prompt))
    if not finite.all():
        rows = sorted({int(row) for row in np.argwhere(~finite)[:, 0]})
        raise ValueError(
            f"The soft prompt has NaN or inf values in rows {rows[:10]}; restore it from an "
            "earlier checkpoint or initialise it again."
        )


def splice_soft_prompt(
    inputs_embeds: jax.Array, soft_prompt: jax.Array, slot_positions: jax.Array
) -> jax.Array:
    """Write the soft prompt over the embeddings at each row's slot positions.

    Jit-able and differentiable with respect to `soft_prompt`. Shapes are
    checked at trace time. NaN/inf values are checked only when `soft_prompt`
    is a concrete array, not inside `jit`.

    Args:
      inputs_embeds: [batch, seq, d] token embeddings with placeholders.
      soft_prompt: [P, d] the soft prompt, cast to `inputs_embeds.dtype`.
      slot_positions: [batch, P] int positions from `format_chat_batch`.

    Returns:
      [batch, seq, d] embeddings with row b, position slot_positions[b, i]
      replaced by soft_prompt[i].

    Raises:
      ValueError: mismatched ranks or sizes.
    """
    _check_splice_shapes(inputs_embeds.shape, soft_prompt.shape, slot_positions.shape)
    if not isinstance(soft_prompt, jax.core.Tracer):
        check_soft_prompt(soft_prompt, inputs_embeds.shape[2])

    batch = inputs_embeds.shape[0]
    rows = jnp.arange(batch)[:, None]
    values = jnp.broadcast_to(soft_prompt.astype(inputs_embeds.dtype), (batch, *soft_prompt.shape))
    return inputs_embeds.at[rows, slot_positions].set(values, unique_indices=True)


def _check_splice_shapes(
    embeds_shape: tuple[int, ...], prompt_shape: tuple[int, ...], slot_shape: tuple[int, ...]
) -> None:
    if len(embeds_shape) != 3:
        raise ValueError(f"inputs_embeds has shape {embeds_shape}; expected [batch, seq, d].")
    if len(prompt_shape) != 2:
        raise ValueError(f"soft_prompt has shape {prompt_shape}; expected [P, d].")
    if len(slot_shape) != 2:
        raise ValueError(f"slot_positions has shape {slot_shape}; expected [batch, P].")
    if prompt_shape[1] != embeds_shape[2]:
        raise ValueError(
            f"soft_prompt has width {prompt_shape[1]} but the embeddings have width "
            f"{embeds_shape[2]} (the model's hidden size); it was made for another model."
        )
    if slot_shape != (embeds_shape[0], prompt_shape[0]):
        raise ValueError(
            f"slot_positions has shape {slot_shape}; expected (batch, P) = "
            f"({embeds_shape[0]}, {prompt_shape[0]}). Format the batch with "
            f"soft_prompt_length={prompt_shape[0]}."
        )
