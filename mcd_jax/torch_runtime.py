"""Run an exported soft prompt with a transformers PyTorch model.

The soft prompt goes where training put it: in the system slot of the model's own chat
template, or before the chat-formatted query for prefix placement. The token layout comes from
`mcd_jax.chat.format_chat_batch`, the same code that formats training batches, so the PyTorch
model gets the same rows as the JAX model did in training. The soft prompt replaces the
placeholders in the slot in `inputs_embeds`.

Example:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from mcd_jax.torch_runtime import SoftPromptRunner

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-7B-Instruct")
    tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-7B-Instruct")
    runner = SoftPromptRunner(model, tokenizer, "runs/qwen-mcd/export")
    print(runner.generate(["How do I pick a lock?"], max_new_tokens=64).texts)

torch is imported when a function needs it, and JAX never: this module and `mcd_jax.export`,
`mcd_jax.chat` import only NumPy, safetensors and the tokenizer's dependencies.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from mcd_jax.chat import ChatBatch, format_chat_batch
from mcd_jax.export import (
    ExportError,
    ModelDescription,
    ModelMismatchError,
    SoftPromptExport,
    check_same_model,
    load_export,
)


@dataclasses.dataclass(frozen=True)
class SoftPromptInputs:
    """Model inputs with the soft prompt spliced in.

    Attributes:
      inputs_embeds: [batch, seq, d] torch tensor in the model's embedding dtype.
      attention_mask: [batch, seq] torch int64, 0 on left padding.
      position_ids: [batch, seq] torch int64, `cumsum(attention_mask) - 1` and 0 on padding.
      batch: the token layout the inputs were built from.
    """

    inputs_embeds: Any
    attention_mask: Any
    position_ids: Any
    batch: ChatBatch


@dataclasses.dataclass(frozen=True)
class GeneratedResponses:
    """Responses generated with the soft prompt, one per query.

    Attributes:
      token_ids: the new token ids of each row, cut after the first stop token.
      texts: the decoded responses, special tokens removed.
    """

    token_ids: list[list[int]]
    texts: list[str]


class SoftPromptRunner:
    """A transformers causal LM, its tokenizer and an exported soft prompt, checked together."""

    def __init__(
        self, model: Any, tokenizer: Any, export: SoftPromptExport | str | os.PathLike[str]
    ) -> None:
        """Load the export if given a path, and check that it fits the model and tokenizer.

        Args:
          model: a transformers `PreTrainedModel` with a causal LM head.
          tokenizer: its tokenizer, with the chat template the prompt was trained with.
          export: a `SoftPromptExport`, or the path of an export folder.

        Raises:
          ModelMismatchError: the architecture, hidden size or chat template differ from the
            model recorded in the export.
        """
        self.export = export if isinstance(export, SoftPromptExport) else load_export(export)
        check_model(self.export, model, tokenizer)
        self.model = model
        self.tokenizer = tokenizer

    @property
    def placement(self) -> str:
        """Where the soft prompt goes: "system_slot" or "prefix"."""
        return self.export.metadata.placement

    def inputs(
        self, queries: Sequence[str], *, pad_to_multiple_of: int | None = None
    ) -> SoftPromptInputs:
        """Chat-format the queries and splice the soft prompt into their embeddings.

        Args:
          queries: user queries, one per row.
          pad_to_multiple_of: round the padded length up to a multiple of this.

        Returns:
          The inputs, on the device of the model's input embeddings.
        """
        import torch

        soft_prompt = self.export.soft_prompt
        batch = format_chat_batch(
            self.tokenizer,
            queries,
            soft_prompt_length=soft_prompt.shape[0],
            placement=self.placement,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        embedding = self.model.get_input_embeddings()
        device = embedding.weight.device
        input_ids = torch.as_tensor(batch.input_ids, dtype=torch.long, device=device)
        with torch.no_grad():
            embeds = embedding(input_ids)
            prompt = torch.as_tensor(soft_prompt, device=device).to(embeds.dtype)
            rows = torch.arange(len(queries), device=device)[:, None]
            slots = torch.as_tensor(batch.slot_positions, dtype=torch.long, device=device)
            embeds[rows, slots] = prompt
        return SoftPromptInputs(
            inputs_embeds=embeds,
            attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.long, device=device),
            position_ids=torch.as_tensor(batch.position_ids, dtype=torch.long, device=device),
            batch=batch,
        )

    def logits(self, queries: Sequence[str]) -> tuple[Any, Any]:
        """Run the model on the queries with the soft prompt.

        Args:
          queries: user queries, one per row.

        Returns:
          (logits [batch, seq, vocab] torch tensor, attention_mask [batch, seq]); logits at
          padded positions are meaningless.
        """
        import torch

        inputs = self.inputs(queries)
        with torch.no_grad():
            output = self.model(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
            )
        return output.logits, inputs.attention_mask

    def generate(
        self,
        queries: Sequence[str],
        *,
        stop_token_ids: Sequence[int] | None = None,
        **generate_kwargs: Any,
    ) -> GeneratedResponses:
        """Generate one response per query with `model.generate(inputs_embeds=...)`.

        Args:
          queries: user queries, one per row.
          stop_token_ids: tokens that end a response; defaults to the tokenizer's EOS and the
            chat end-of-turn tokens in its vocabulary (as `mcd_jax.generation` uses).
          **generate_kwargs: passed to `model.generate`, e.g. `max_new_tokens`, `do_sample`.

        Returns:
          The new tokens and texts of each row.
        """
        import torch

        stop_ids = list(stop_token_ids or default_stop_token_ids(self.tokenizer))
        inputs = self.inputs(queries)
        with torch.no_grad():
            output = self.model.generate(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                eos_token_id=stop_ids,
                pad_token_id=inputs.batch.pad_id,
                **generate_kwargs,
            )
        token_ids = [_cut_after_stop(row, stop_ids) for row in output.tolist()]
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in token_ids]
        return GeneratedResponses(token_ids=token_ids, texts=texts)


def check_model(export: SoftPromptExport, model: Any, tokenizer: Any) -> None:
    """Check that a transformers model and tokenizer are those the soft prompt was trained for.

    Args:
      export: the loaded export.
      model: a transformers `PreTrainedModel`.
      tokenizer: its tokenizer.

    Raises:
      ModelMismatchError: the architecture, the input-embedding width or the chat template
        differ from those recorded in the export.
    """
    config = model.config
    hf_config = {
        "model_type": config.model_type,
        "hidden_size": model.get_input_embeddings().weight.shape[1],
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
    }
    source = {"kind": "transformers", "path": getattr(config, "name_or_path", "")}
    try:
        target = ModelDescription.from_parts(hf_config, tokenizer, source)
    except ExportError as error:
        raise ModelMismatchError(str(error)) from error

    check_same_model(export.metadata.model, target)


def default_stop_token_ids(tokenizer: Any) -> list[int]:
    """Return the tokenizer's EOS id and the chat end-of-turn tokens in its vocabulary.

    The same tokens as `mcd_jax.generation.default_stop_token_ids`, repeated here because that
    module imports JAX.
    """
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "</s>"):
        if token in vocab:
            ids.add(int(vocab[token]))
    return sorted(ids)


def _cut_after_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    stops = set(stop_ids)
    for index, token in enumerate(row):
        if token in stops:
            return row[: index + 1]
    return row
