"""Chat formatting with a system slot for the soft prompt.

MCD places its soft prompt where the frozen model's own chat template puts the
system prompt, so every stage (estimation, training, evaluation, generation)
formats queries through `format_chat_batch`. The slot is found by rendering the
template twice with two different sentinel system texts: the characters where
the two renderings differ are the system text, and the tokens that cover those
characters are the slot. No rule depends on the model's name.

Contract of a formatted row, left to right:

    [pad ... pad][template tokens before the slot][slot][template tokens after]

- Rendered text is tokenized the way `tokenizer.apply_chat_template(...,
  tokenize=True)` does it (transformers 5.25): `add_special_tokens=False`, so a
  BOS appears once when the template writes `bos_token` and never otherwise.
- With a text prompt the row equals `apply_chat_template([system, user])`.
- With a soft prompt of length P the slot contains P placeholder ids (the pad id)
  whose embeddings the caller replaces (see `mcd_jax.soft_prompt`). The slot
  also covers whitespace that the tokenizer merges into the system text's first
  or last token, e.g. the space after Mistral's "[INST]" with a byte-level BPE
  tokenizer, so a soft prompt replaces that whitespace too.
- With neither, the row equals `apply_chat_template([user])`. That is whatever
  the template does with no system message: Qwen2.5's template inserts its own
  default system prompt ("You are Qwen, created by Alibaba Cloud. ..."),
  SmolLM2's inserts "You are a helpful AI assistant named SmolLM, ...".
- Templates that raise on a system message (Mistral v0.1) get the system text
  at the start of the first user turn as "system\\n\\nquery", the way those model
  families are conventionally prompted. Templates that fold the system message
  into the first user turn themselves (Gemma) are followed as they are.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from jinja2.exceptions import TemplateError

# Two sentinels with different first and last characters, so the common prefix
# and suffix of two renderings stop exactly at the system text.
_SENTINELS = ("SLOTSENTINELA", "slotsentinelz")

# The separator between the system text and the query when the template has no
# system role and the system text is put at the start of the first user turn.
USER_TURN_SEPARATOR = "\n\n"

PLACEMENTS = ("system_slot", "prefix")


class SlotLocation(enum.Enum):
    """Location of the system text in a rendered chat template."""

    SYSTEM_MESSAGE = "system_message"  # The template renders a system message.
    # The template raises on a system message, so the system text starts the user turn.
    FIRST_USER_TURN = "first_user_turn"


@dataclasses.dataclass(frozen=True)
class ChatBatch:
    """A left-padded batch of chat-formatted queries.

    Attributes:
      input_ids: [batch, seq] int32 token ids; pads and soft-prompt
        placeholders contain `pad_id`.
      attention_mask: [batch, seq] int32, 0 on left padding, 1 elsewhere.
      position_ids: [batch, seq] int32, `cumsum(attention_mask) - 1` with 0 on
        padding, as `transformers` (5.25) derives them for generation.
      slot_positions: [batch, P] int32 positions of the soft prompt's rows in
        each row, or None when no soft prompt was requested.
      lengths: [batch] int32 number of real (unpadded) tokens per row.
      pad_id: the id used for padding and for soft-prompt placeholders.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    slot_positions: np.ndarray | None
    lengths: np.ndarray
    pad_id: int


@dataclasses.dataclass(frozen=True)
class SlotSplit:
    """The token ids of one rendered conversation, split around the system slot.

    Attributes:
      before: ids of the template text before the slot.
      slot: ids covering the system text (may include whitespace the tokenizer
        merges into the first or last system token).
      after: ids of the template text and query after the slot.
      location: where the template put the system text.
    """

    before: list[int]
    slot: list[int]
    after: list[int]
    location: SlotLocation


def format_chat_batch(
    tokenizer: Any,
    queries: Sequence[str],
    *,
    text_prompt: str | None = None,
    soft_prompt_length: int | None = None,
    placement: str = "system_slot",
    add_generation_prompt: bool = True,
    pad_to_multiple_of: int | None = None,
    bucket_lengths: Sequence[int] | None = None,
    max_length: int | None = None,
) -> ChatBatch:
    """Format user queries with the tokenizer's chat template into a padded batch.

    Pass at most one of `text_prompt` and `soft_prompt_length`; with neither,
    the template renders the query with no system message.

    With `placement="prefix"` (PEFT prompt-tuning layout) the P soft-prompt
    rows come before everything, BOS included, and the text is the query with
    no system message: a row is `[pads][P placeholders][text]`, slot positions
    are 0..P-1 and text positions P..P+T-1 whatever the padding.

    NOTE: PEFT 0.21 instead puts its virtual tokens before an already
    left-padded batch and numbers positions across the padding, so its padded
    rows see shifted positions. Unpadded rows agree exactly with PEFT's
    PromptTuning, and here a padded row gives the same logits as unpadded.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      queries: user queries, one per row; none may be empty.
      text_prompt: a text prompt for the system slot.
      soft_prompt_length: P, the number of soft-prompt rows to reserve.
      placement: "system_slot" (the template's system slot) or "prefix".
      add_generation_prompt: append the assistant header, as for generation.
      pad_to_multiple_of: round the padded length up to a multiple of this.
      bucket_lengths: pad to the smallest of these lengths that fits the
        longest row, so jitted callers compile once per bucket.
      max_length: the model's context length; a longer row is an error, and
        padding never goes past it.

    Returns:
      A `ChatBatch` of NumPy arrays.

    Raises:
      ValueError: on an empty query, a tokenizer without a chat template, a
        soft-prompt length below 1, a row longer than `max_length`, a template
        with no findable system slot, or conflicting options.
    """
    _check_options(
        text_prompt, soft_prompt_length, placement, pad_to_multiple_of, bucket_lengths, max_length
    )
    _check_queries(queries)
    require_chat_template(tokenizer)
    pad_id = placeholder_id(tokenizer)

    rows: list[list[int]] = []
    slot_starts: list[int] = []
    for query in queries:
        ids, slot_start = _format_row(
            tokenizer, query, text_prompt, soft_prompt_length, placement, add_generation_prompt
        )
        rows.append(ids)
        slot_starts.append(slot_start)

    lengths = [len(ids) for ids in rows]
    _check_max_length(lengths, max_length)
    seq = _padded_length(max(lengths), pad_to_multiple_of, bucket_lengths, max_length)
    return _left_pad(rows, slot_starts, soft_prompt_length, seq, pad_id)


def _format_row(
    tokenizer: Any,
    query: str,
    text_prompt: str | None,
    soft_prompt_length: int | None,
    placement: str,
    add_generation_prompt: bool,
) -> tuple[list[int], int]:
    """Build one unpadded row; return its ids and where the slot starts (-1: none)."""
    if soft_prompt_length is None:
        return render_ids(tokenizer, query, text_prompt, add_generation_prompt), -1

    placeholders = [placeholder_id(tokenizer)] * soft_prompt_length
    if placement == "prefix":
        return placeholders + render_ids(tokenizer, query, None, add_generation_prompt), 0

    split = split_at_system_slot(tokenizer, query, None, add_generation_prompt)
    return split.before + placeholders + split.after, len(split.before)


def render_ids(
    tokenizer: Any, query: str, text_prompt: str | None, add_generation_prompt: bool = True
) -> list[int]:
    """Tokenize one query in the chat template, with an optional text prompt.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      query: the user query.
      text_prompt: the system text, or None for no system message.
      add_generation_prompt: append the assistant header.

    Returns:
      The token ids, equal to `apply_chat_template(..., tokenize=True)` on the
      same messages (with the system text moved into the user turn for
      templates that raise on a system message).
    """
    if text_prompt is None:
        text = _render(tokenizer, [{"role": "user", "content": query}], add_generation_prompt)
    else:
        location = system_slot_location(tokenizer)
        messages = _messages(location, text_prompt, query)
        text = _render(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_at_system_slot(
    tokenizer: Any, query: str, system_text: str | None, add_generation_prompt: bool = True
) -> SlotSplit:
    """Tokenize one query with a system text and split the ids around the slot.

    With `system_text=None` a sentinel replaces it, which is how the
    template tokens around a soft prompt are found. The split is checked to
    be the same for both sentinels (and for `system_text`), so placeholders
    spliced between `before` and `after` line up with the template exactly.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      query: the user query.
      system_text: the text in the system slot, or None for a sentinel.
      add_generation_prompt: append the assistant header.

    Returns:
      The ids before, inside and after the system slot.

    Raises:
      ValueError: the template has no system slot, or the tokenizer merges
        the system text with the template text around it.
    """
    location = system_slot_location(tokenizer)
    renders = [
        _render(tokenizer, _messages(location, sentinel, query), add_generation_prompt)
        for sentinel in _SENTINELS
    ]
    start, suffix_chars = _differing_span(renders, tokenizer)

    splits = [_split_tokens(tokenizer, text, start, len(text) - suffix_chars) for text in renders]
    if system_text is not None:
        text = _render(tokenizer, _messages(location, system_text, query), add_generation_prompt)
        _check_same_template_text(text, renders[0], start, suffix_chars, tokenizer)
        splits.append(_split_tokens(tokenizer, text, start, len(text) - suffix_chars))

    for other in splits[1:]:
        if other[0] != splits[0][0] or other[2] != splits[0][2]:
            raise ValueError(
                f"The tokens around the system slot of {_name(tokenizer)} change with the "
                "system text, so a soft prompt cannot be spliced in at fixed positions. The "
                "tokenizer merges the system text with the template text next to it; strip "
                "leading and trailing whitespace from the text prompt."
            )
    before, slot, after = splits[-1]
    return SlotSplit(before=before, slot=slot, after=after, location=location)


def system_slot_location(tokenizer: Any) -> SlotLocation:
    """Find where the tokenizer's chat template puts a system text.

    Args:
      tokenizer: a transformers tokenizer with a chat template.

    Returns:
      `SYSTEM_MESSAGE` when the template renders a system message (in its own
      turn or folded into the user turn, as Gemma does), `FIRST_USER_TURN`
      when the template raises on one.

    Raises:
      ValueError: no chat template, or the template renders a system message
        without its text (it drops it), so there is no slot.
    """
    require_chat_template(tokenizer)
    query = "query"
    try:
        renders = [
            _render(tokenizer, _messages(SlotLocation.SYSTEM_MESSAGE, sentinel, query), True)
            for sentinel in _SENTINELS
        ]
    except TemplateError as error:
        _log_fallback_once(tokenizer, error)
        return SlotLocation.FIRST_USER_TURN

    if renders[0] == renders[1]:
        raise ValueError(
            f"The chat template of {_name(tokenizer)} drops the system message, so there is no "
            "system slot for a text or soft prompt. Set `tokenizer.chat_template` to a template "
            "that renders system messages."
        )
    return SlotLocation.SYSTEM_MESSAGE


def require_chat_template(tokenizer: Any) -> None:
    """Raise a ValueError naming the tokenizer when it has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"Tokenizer {_name(tokenizer)} has no chat template. Load the tokenizer of a chat "
            "(instruct) model, or set one with `tokenizer.chat_template = <Jinja template str>`."
        )


def placeholder_id(tokenizer: Any) -> int:
    """Return the id used for left padding and soft-prompt placeholders.

    The pad token when the tokenizer has one, else the EOS token. The value
    never reaches the model: padding is masked and placeholders are replaced.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        f"Tokenizer {_name(tokenizer)} has neither a pad token nor an EOS token; set "
        "`tokenizer.pad_token` before formatting batches."
    )


def _messages(location: SlotLocation, system_text: str, query: str) -> list[dict[str, str]]:
    if location is SlotLocation.FIRST_USER_TURN:
        return [{"role": "user", "content": system_text + USER_TURN_SEPARATOR + query}]
    return [{"role": "system", "content": system_text}, {"role": "user", "content": query}]


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _differing_span(renders: list[str], tokenizer: Any) -> tuple[int, int]:
    """Return (start, number of trailing chars) of the one span where two renderings differ."""
    first, second = renders
    start = 0
    while start < min(len(first), len(second)) and first[start] == second[start]:
        start += 1
    suffix = 0
    limit = min(len(first), len(second)) - start
    while suffix < limit and first[-1 - suffix] == second[-1 - suffix]:
        suffix += 1

    for text, sentinel in zip(renders, _SENTINELS, strict=True):
        if text[start : len(text) - suffix] != sentinel:
            raise ValueError(
                f"Cannot find the system slot in the chat template of {_name(tokenizer)}: the "
                f"system text {sentinel!r} does not appear exactly once and unchanged "
                f"(rendered {text[:300]!r}...). Use a template that writes the system message "
                "verbatim."
            )
    return start, suffix


def _check_same_template_text(
    text: str, reference: str, start: int, suffix_chars: int, tokenizer: Any
) -> None:
    same_before = text[:start] == reference[:start]
    same_after = text[len(text) - suffix_chars :] == reference[len(reference) - suffix_chars :]
    if not (same_before and same_after):
        raise ValueError(
            f"The chat template of {_name(tokenizer)} renders the text around the system "
            "slot differently for different system texts, so the slot cannot be located."
        )


def _split_tokens(
    tokenizer: Any, text: str, start: int, end: int
) -> tuple[list[int], list[int], list[int]]:
    """Split the ids of `text` into those before, covering and after chars [start, end)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    before, slot, after = [], [], []
    slot_chars = [start, end]
    for token_id, (token_start, token_end) in zip(
        encoding["input_ids"], encoding["offset_mapping"], strict=True
    ):
        if token_end <= start and not slot:
            before.append(token_id)
        elif token_start >= end:
            after.append(token_id)
        else:
            slot.append(token_id)
            slot_chars = [min(slot_chars[0], token_start), max(slot_chars[1], token_end)]

    merged = text[slot_chars[0] : start] + text[end : slot_chars[1]]
    if merged.strip() or not slot:
        raise ValueError(
            f"The tokenizer {_name(tokenizer)} merges the system text with the template text "
            f"{merged!r} next to it, so the system slot has no token boundary."
        )
    return before, slot, after


def _left_pad(
    rows: list[list[int]],
    slot_starts: list[int],
    soft_prompt_length: int | None,
    seq: int,
    pad_id: int,
) -> ChatBatch:
    batch = len(rows)
    input_ids = np.full((batch, seq), pad_id, dtype=np.int32)
    attention_mask = np.zeros((batch, seq), dtype=np.int32)
    slot_positions = None
    if soft_prompt_length is not None:
        slot_positions = np.zeros((batch, soft_prompt_length), dtype=np.int32)

    for row, (ids, slot_start) in enumerate(zip(rows, slot_starts, strict=True)):
        pads = seq - len(ids)
        input_ids[row, pads:] = ids
        attention_mask[row, pads:] = 1
        if slot_positions is not None:
            slot_positions[row] = pads + slot_start + np.arange(soft_prompt_length)

    position_ids = np.where(attention_mask == 1, np.cumsum(attention_mask, axis=1) - 1, 0)
    return ChatBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids.astype(np.int32),
        slot_positions=slot_positions,
        lengths=np.array([len(ids) for ids in rows], dtype=np.int32),
        pad_id=pad_id,
    )


def _padded_length(
    longest: int,
    pad_to_multiple_of: int | None,
    bucket_lengths: Sequence[int] | None,
    max_length: int | None,
) -> int:
    seq = longest
    if pad_to_multiple_of is not None:
        seq = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if bucket_lengths is not None:
        fitting = [length for length in bucket_lengths if length >= longest]
        if not fitting:
            raise ValueError(
                f"The longest row has {longest} tokens, more than the maximum bucket length "
                f"{max(bucket_lengths)}; add a larger bucket to bucket_lengths."
            )
        seq = min(fitting)
    if max_length is not None:
        seq = min(seq, max_length)
    return seq


def _check_max_length(lengths: list[int], max_length: int | None) -> None:
    if max_length is None:
        return
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(
                f"Query {index} is {length} tokens long after chat formatting, more than the "
                f"model's context max_length={max_length}. Shorten or drop the query."
            )


def _check_options(
    text_prompt: str | None,
    soft_prompt_length: int | None,
    placement: str,
    pad_to_multiple_of: int | None,
    bucket_lengths: Sequence[int] | None,
    max_length: int | None,
) -> None:
    if text_prompt is not None and soft_prompt_length is not None:
        raise ValueError("Pass either text_prompt or soft_prompt_length, not both.")
    if text_prompt is not None and not text_prompt.strip():
        raise ValueError(
            f"text_prompt={text_prompt!r} is empty; pass text_prompt=None for no system prompt."
        )
    if soft_prompt_length is not None:
        if isinstance(soft_prompt_length, bool) or not isinstance(soft_prompt_length, int):
            raise ValueError(f"soft_prompt_length={soft_prompt_length!r} must be an int >= 1.")
        if soft_prompt_length < 1:
            raise ValueError(f"soft_prompt_length={soft_prompt_length} must be at least 1.")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not one of {PLACEMENTS}.")
    if placement == "prefix" and soft_prompt_length is None:
        raise ValueError('placement="prefix" places a soft prompt; pass soft_prompt_length.')
    if pad_to_multiple_of is not None and bucket_lengths is not None:
        raise ValueError("Pass either pad_to_multiple_of or bucket_lengths, not both.")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be at least 1.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length} must be at least 1 (the model's context).")
    if bucket_lengths is not None and (not bucket_lengths or min(bucket_lengths) < 1):
        raise ValueError(f"bucket_lengths={list(bucket_lengths)} must be positive lengths.")


def _check_queries(queries: Sequence[str]) -> None:
    if isinstance(queries, str):
        raise ValueError(
            "queries must be a sequence of strings, not one string; wrap it in a list."
        )
    if len(queries) == 0:
        raise ValueError("queries is empty; pass at least one query.")
    for index, query in enumerate(queries):
        if not isinstance(query, str):
            raise ValueError(f"Query {index} is a {type(query).__name__}, expected a str.")
        if not query.strip():
            raise ValueError(f"Query {index} is empty ({query!r}); drop it or give its text.")


_LOGGED_FALLBACKS: set[str] = set()


def _log_fallback_once(tokenizer: Any, error: TemplateError) -> None:
    name = _name(tokenizer)
    if name in _LOGGED_FALLBACKS:
        return
    _LOGGED_FALLBACKS.add(name)
    logging.info(
        "The chat template of %s raises on a system message (%s); the system text goes at "
        "the start of the first user turn instead.",
        name,
        error,
    )


def _name(tokenizer: Any) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
