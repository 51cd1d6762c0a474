"""Last-position final-norm states `h(x)` of chat-formatted queries.

Estimation, the text-prompt states and the soft-prompt states of the training step all
read the same vector. It is the frozen model's final-norm hidden state at the last input
position, the end of the chat template's generation prompt. This module computes it in
batches, jitted once per padded shape, with a text prompt, a soft prompt or nothing in the
system slot.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mcd_jax.chat import ChatBatch, format_chat_batch
from mcd_jax.models.transformer import Transformer
from mcd_jax.sharding import to_host
from mcd_jax.soft_prompt import check_soft_prompt, splice_soft_prompt


def last_position_states(
    model: Transformer,
    inputs_embeds: jax.Array,
    attention_mask: jax.Array,
    position_ids: jax.Array,
) -> jax.Array:
    """Run the model and return its final-norm state at the last position.

    Prompts are left-padded, so the last position is the last real token of
    every row.

    Args:
      model: the frozen transformer.
      inputs_embeds: [batch, seq, d] input vectors.
      attention_mask: [batch, seq] 1 for real tokens.
      position_ids: [batch, seq] RoPE positions.

    Returns:
      [batch, d] float32 states.
    """
    output = model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids
    )
    return output.hidden_states[:, -1]


def compute_states(
    model: Transformer,
    tokenizer: Any,
    queries: Sequence[str],
    *,
    text_prompt: str | None = None,
    soft_prompt: jax.Array | np.ndarray | None = None,
    placement: str = "system_slot",
    batch_size: int = 16,
    pad_to_multiple_of: int = 32,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Compute `h(x)` for every query, with the given prompt in the system slot.

    Args:
      model: the frozen transformer.
      tokenizer: its tokenizer, with a chat template.
      queries: user queries.
      text_prompt: a text prompt for the system slot, or None.
      soft_prompt: a [P, d] soft prompt, or None. At most one of the two prompts.
      placement: "system_slot" or "prefix", for a soft prompt.
      batch_size: rows per compiled batch; the last batch is padded.
      pad_to_multiple_of: prompts are padded to a multiple of this many tokens.
      mesh: a ("data", "fsdp", "tensor") mesh; the batch is sharded over data and fsdp.

    Returns:
      [len(queries), d] float32 states, in query order.

    Raises:
      ValueError: both prompts, a soft prompt of the wrong shape, an empty query,
        or a query longer than the model's context.
    """
    if text_prompt is not None and soft_prompt is not None:
        raise ValueError("pass a text prompt or a soft prompt, not both.")
    if soft_prompt is not None:
        check_soft_prompt(soft_prompt, model.config.hidden_size)
        soft_prompt = jnp.asarray(soft_prompt, jnp.float32)

    graphdef, state = nnx.split(model)
    outputs = []
    for start in range(0, len(queries), batch_size):
        chunk = list(queries[start : start + batch_size])
        batch = format_chat_batch(
            tokenizer,
            chunk,
            text_prompt=text_prompt,
            soft_prompt_length=None if soft_prompt is None else soft_prompt.shape[0],
            placement=placement,
            pad_to_multiple_of=pad_to_multiple_of,
            max_length=model.config.max_position_embeddings,
        )
        arrays = batch_arrays(batch, batch_size, mesh)
        states = _states_jit(graphdef, state, arrays, soft_prompt)
        outputs.append(to_host(states)[: len(chunk)])
    if not outputs:
        return np.zeros((0, model.config.hidden_size), np.float32)
    return np.concatenate(outputs)


def batch_arrays(batch: ChatBatch, rows: int, mesh: Mesh | None) -> dict[str, jax.Array]:
    """Pad a chat batch to `rows` rows (copies of row 0) and place it on devices."""
    arrays = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
    }
    if batch.slot_positions is not None:
        arrays["slot_positions"] = batch.slot_positions
    missing = rows - batch.input_ids.shape[0]
    if missing > 0:
        arrays = {
            name: np.concatenate([value, np.repeat(value[:1], missing, axis=0)])
            for name, value in arrays.items()
        }
    if mesh is None:
        return {name: jnp.asarray(value) for name, value in arrays.items()}
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    return {name: jax.device_put(value, sharding) for name, value in arrays.items()}


@functools.partial(jax.jit, static_argnums=0)
def _states_jit(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    arrays: dict[str, jax.Array],
    soft_prompt: jax.Array | None,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    embeds = model.embed(arrays["input_ids"])
    if soft_prompt is not None:
        embeds = splice_soft_prompt(embeds, soft_prompt, arrays["slot_positions"])
    return last_position_states(model, embeds, arrays["attention_mask"], arrays["position_ids"])
