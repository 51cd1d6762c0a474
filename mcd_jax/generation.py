"""Batched generation with a preallocated KV cache, for text or soft prompts.

Estimation labels, evaluation and the demo all generate many short responses in
many languages, so generation is one jitted function per padded shape. It runs a
prefill over the left-padded chat-formatted batch, with the soft prompt spliced
into the system slot when there is one. A `lax.while_loop` then decodes one
token per step until every row has stopped or `max_new_tokens` is reached.
Batches are padded to a fixed row count and prompts to a multiple of
`pad_to_multiple_of` tokens, so a run compiles once per bucket, not per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from mcd_jax.chat import format_chat_batch
from mcd_jax.models.transformer import Transformer
from mcd_jax.sampling import SamplingConfig, select_next_tokens
from mcd_jax.sharding import to_host
from mcd_jax.soft_prompt import check_soft_prompt, splice_soft_prompt
from mcd_jax.states import batch_arrays


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated responses, one per query, in the order of the queries.

    Attributes:
      token_ids: the generated ids of each row, ending with the stop token when the
        row stopped on one.
      texts: the decoded responses, special tokens removed.
      stopped: True where the row ended on a stop token, False where it reached
        `max_new_tokens`.
    """

    token_ids: list[list[int]]
    texts: list[str]
    stopped: list[bool]


def default_stop_token_ids(tokenizer: Any, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Collect the tokenizer's EOS id, the chat end-of-turn tokens in its vocabulary, and `extra`.

    Chat models end a turn with a template token (ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`) that is not always the tokenizer's EOS, so those are added when
    the vocabulary has them.
    """
    ids = set(extra)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "</s>"):
        if token in vocab:
            ids.add(int(vocab[token]))
    return tuple(sorted(ids))


def generate(
    model: Transformer,
    tokenizer: Any,
    queries: Sequence[str],
    *,
    sampling: SamplingConfig,
    text_prompt: str | None = None,
    soft_prompt: jax.Array | np.ndarray | None = None,
    placement: str = "system_slot",
    batch_size: int = 16,
    pad_to_multiple_of: int = 32,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Generate one response per query.

    Args:
      model: the frozen transformer.
      tokenizer: its tokenizer, with a chat template.
      queries: user queries; none may be empty.
      sampling: decoding settings. With no `stop_token_ids`, generation runs to
        `max_new_tokens`; see `default_stop_token_ids`.
      text_prompt: a text prompt for the system slot.
      soft_prompt: a [P, d] soft prompt for the system slot (or the prefix).
      placement: "system_slot" or "prefix", for a soft prompt.
      batch_size: rows per compiled batch; the last batch is padded to this size.
        Under a mesh it must be a multiple of the batch-parallel devices.
      pad_to_multiple_of: prompts are padded to a multiple of this many tokens.
      mesh: a ("data", "fsdp", "tensor") mesh; the batch is sharded over data and fsdp.

    Returns:
      The generated ids and texts, in query order.

    Raises:
      ValueError: an empty query, a prompt that leaves no room for `max_new_tokens`
        in the model's context, a soft prompt of the wrong shape, both kinds of
        prompt, or a batch size the mesh does not divide.
    """
    if text_prompt is not None and soft_prompt is not None:
        raise ValueError("pass a text prompt or a soft prompt, not both.")
    if soft_prompt is not None:
        check_soft_prompt(soft_prompt, model.config.hidden_size)
        soft_prompt = jnp.asarray(soft_prompt, jnp.float32)
    _check_batch_size(batch_size, mesh)

    context = model.config.max_position_embeddings
    graphdef, state = nnx.split(model)
    results: list[tuple[list[int], bool]] = []
    for start in range(0, len(queries), batch_size):
        chunk = list(queries[start : start + batch_size])
        batch = format_chat_batch(
            tokenizer,
            chunk,
            text_prompt=text_prompt,
            soft_prompt_length=None if soft_prompt is None else soft_prompt.shape[0],
            placement=placement,
            pad_to_multiple_of=pad_to_multiple_of,
            max_length=context - sampling.max_new_tokens,
        )
        arrays = batch_arrays(batch, batch_size, mesh)
        key = jax.random.fold_in(jax.random.key(sampling.seed), start)
        tokens, num_tokens = _generate_jit(
            graphdef, state, arrays, soft_prompt, key, sampling, batch.pad_id
        )
        tokens, num_tokens = to_host(tokens), to_host(num_tokens)
        for row in range(len(chunk)):
            results.append(_row_result(tokens[row], int(num_tokens[row]), sampling))
        done = start + len(chunk)
        logging.log_every_n(logging.INFO, "Generated %d/%d responses", 10, done, len(queries))

    token_ids = [ids for ids, _ in results]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return GenerationResult(token_ids=token_ids, texts=texts, stopped=[s for _, s in results])


def _check_batch_size(batch_size: int, mesh: Mesh | None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if mesh is None:
        return
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % parallel:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of the mesh's batch-parallel size "
            f"data x fsdp = {parallel}; choose a multiple of {parallel}."
        )


def _row_result(tokens: np.ndarray, count: int, sampling: SamplingConfig) -> tuple[list[int], bool]:
    ids = tokens[:count].tolist()
    stopped = bool(ids) and ids[-1] in sampling.stop_token_ids
    return ids, stopped


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate_jit(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    arrays: dict[str, jax.Array],
    soft_prompt: jax.Array | None,
    key: jax.Array,
    sampling: SamplingConfig,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
    """Prefill and decode one padded batch.

    Returns:
      tokens: [batch, max_new_tokens] int32, `pad_id` after a row stopped.
      num_tokens: [batch] int32, how many tokens each row generated (the stop
        token included).
    """
    model = nnx.merge(graphdef, state)
    input_ids = arrays["input_ids"]
    batch, prompt_len = input_ids.shape
    max_new = sampling.max_new_tokens

    embeds = model.embed(input_ids)
    if soft_prompt is not None:
        embeds = splice_soft_prompt(embeds, soft_prompt, arrays["slot_positions"])
    cache = model.init_cache(batch, prompt_len + max_new)
    mask = jnp.concatenate(
        [arrays["attention_mask"], jnp.zeros((batch, max_new), jnp.int32)], axis=1
    )
    prefill = model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=arrays["position_ids"], cache=cache
    )
    logits = model.compute_logits(prefill.hidden_states[:, -1])
    key, subkey = jax.random.split(key)
    first = select_next_tokens(logits, jnp.int32(0), subkey, sampling)

    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
    tokens = jnp.full((batch, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)
    num_tokens = jnp.ones((batch,), jnp.int32)
    positions = arrays["position_ids"][:, -1] + 1
    carry = (jnp.int32(1), prefill.cache, mask, positions, tokens, done, num_tokens, key)

    def keep_going(carry):
        step, *_, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def decode_step(carry):
        step, cache, mask, positions, tokens, done, num_tokens, key = carry
        mask = mask.at[:, prompt_len + step - 1].set(1)
        output = model(
            jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1),
            attention_mask=mask,
            position_ids=positions[:, None],
            cache=cache,
        )
        logits = model.compute_logits(output.hidden_states[:, -1])
        key, subkey = jax.random.split(key)
        token = select_next_tokens(logits, step, subkey, sampling)
        token = jnp.where(done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        num_tokens = num_tokens + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return (step + 1, output.cache, mask, positions + 1, tokens, done, num_tokens, key)

    carry = jax.lax.while_loop(keep_going, decode_step, carry)
    return carry[4], carry[6]
