"""One MCD training step in PyTorch eager with transformers, the baseline for the JAX step.

`bench_train_step.py` times it against `mcd_jax.training.step.TrainStep` on the same batch.
It is written for that benchmark and follows how a PyTorch implementation of the method on
transformers runs a step. The soft prompt is spliced into `inputs_embeds`. The causal LM runs
forward with `output_hidden_states=True`, and the last entry of `hidden_states` (after the
final norm) at the last position is the soft-prompt state. Then come the four loss terms,
`backward()`, global-norm clipping and AdamW. The soft prompt is kept in the model's dtype,
as the MCD authors' code keeps it. The causal LM also applies its LM head to every position,
which the objective never reads, so `lm_head="skip"` runs the decoder alone to show what that
costs.

PyTorch is imported here only; the `mcd_jax` package never imports this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import transformers

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class ReferenceMethod:
    """The fitted transform and probes, and the loss weights, as NumPy arrays.

    Attributes:
        mean: PCA mean, `[d]`.
        basis: Orthonormal basis, `[d, d]`.
        num_components: m, the size of the safety subspace.
        refusal_weight: f_r weight, `[m]`.
        refusal_bias: f_r bias, a scalar.
        harmfulness_weight: f_h weight, `[m]`.
        harmfulness_bias: f_h bias, a scalar.
        loss_weights: Weights of L_r, L_h, L_U and L_m, the MCD reference's by default.
    """

    mean: np.ndarray
    basis: np.ndarray
    num_components: int
    refusal_weight: np.ndarray
    refusal_bias: float
    harmfulness_weight: np.ndarray
    harmfulness_bias: float
    loss_weights: tuple[float, float, float, float] = (1.0, 0.01, 0.001, 0.001)


def load_torch_model(
    gguf_path: str | Path, dtype: str = "bfloat16"
) -> transformers.PreTrainedModel:
    """Load a causal LM from a GGUF file, dequantized to dense `dtype` weights, frozen.

    transformers 5.25 keeps GGUF weights in their quantized blocks by default and
    dequantizes them inside every matmul. `GgufConfig(dequantize=True)` unpacks them once at
    load time instead, so the model runs plain dense matmuls like a model loaded from
    safetensors, and like the JAX model, which also dequantizes at load time.

    Args:
        gguf_path: The `.gguf` file.
        dtype: "bfloat16" or "float32".

    Returns:
        The model in eval mode, every parameter with `requires_grad=False`.

    Raises:
        ValueError: If `dtype` is not one of `TORCH_DTYPES`.
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; use one of {sorted(TORCH_DTYPES)}")
    path = Path(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=TORCH_DTYPES[dtype],
        quantization_config=transformers.GgufConfig(dequantize=True),
    )
    model.eval()
    model.requires_grad_(False)
    return model


class ReferenceStep:
    """The PyTorch training step: the soft prompt, its AdamW state and the loss.

    Call it with a batch of NumPy arrays; each call takes one optimizer step.
    """

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        soft_prompt: np.ndarray,
        method: ReferenceMethod,
        *,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        grad_clip: float = 1.0,
        lm_head: Literal["all_positions", "skip"] = "all_positions",
    ) -> None:
        """Prepare the step.

        Args:
            model: From `load_torch_model`.
            soft_prompt: Initial soft prompt, `[P, d]`; kept in the model's dtype.
            method: Transform, probes and loss weights.
            learning_rate: AdamW step size.
            weight_decay: AdamW decoupled weight decay.
            grad_clip: Maximum global gradient norm.
            lm_head: "all_positions" runs the causal LM with its LM head, as the reference
                does. "skip" runs the decoder and final norm alone.
        """
        if lm_head not in ("all_positions", "skip"):
            raise ValueError(f"lm_head={lm_head!r} is invalid; use 'all_positions' or 'skip'")
        self.model = model
        self.lm_head = lm_head
        self.grad_clip = grad_clip
        dtype = model.get_input_embeddings().weight.dtype
        self.soft_prompt = torch.nn.Parameter(torch.tensor(soft_prompt, dtype=dtype))
        self.optimizer = torch.optim.AdamW(
            [self.soft_prompt],
            lr=learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=weight_decay,
        )
        self.method = method
        self._mean = torch.tensor(method.mean, dtype=torch.float32)
        self._basis = torch.tensor(method.basis, dtype=torch.float32)
        self._refusal = torch.tensor(method.refusal_weight, dtype=torch.float32)
        self._harmfulness = torch.tensor(method.harmfulness_weight, dtype=torch.float32)

    def soft_prompt_states(self, batch: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Run the frozen model with the soft prompt spliced in; return `[batch, d]` float32."""
        input_ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
        slots = torch.from_numpy(np.asarray(batch["slot_positions"], np.int64))
        embeds = self.model.get_input_embeddings()(input_ids)
        rows = torch.arange(embeds.shape[0])[:, None]
        embeds = embeds.index_put((rows, slots), self.soft_prompt.expand(len(slots), -1, -1))

        inputs = dict(
            inputs_embeds=embeds,
            attention_mask=torch.from_numpy(np.asarray(batch["attention_mask"], np.int64)),
            position_ids=torch.from_numpy(np.asarray(batch["position_ids"], np.int64)),
        )
        if self.lm_head == "all_positions":
            output = self.model(**inputs, output_hidden_states=True)
            final = output.hidden_states[-1]
        else:
            final = self.model.model(**inputs).last_hidden_state
        return final[:, -1].float()

    def loss(
        self, states: torch.Tensor, batch: Mapping[str, np.ndarray]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Compute the weighted objective of soft-prompt states `[batch, d]`."""
        m = self.method.num_components
        labels = torch.from_numpy(np.asarray(batch["labels"], np.float32))
        transformed = (states - self._mean) @ self._basis
        safety = transformed[:, :m]

        refusal_logits = safety @ self._refusal + self.method.refusal_bias
        harmfulness_logits = safety @ self._harmfulness + self.method.harmfulness_bias
        base_refusal = torch.from_numpy(np.asarray(batch["refusal_logits"], np.float32))
        base_harmfulness = torch.from_numpy(np.asarray(batch["harmfulness_logits"], np.float32))
        complement = torch.from_numpy(np.asarray(batch["complement"], np.float32))
        terms = {
            "refusal": F.binary_cross_entropy_with_logits(refusal_logits - base_refusal, labels),
            "harmfulness": F.binary_cross_entropy_with_logits(
                harmfulness_logits - base_harmfulness, labels
            ),
            "complement": torch.mean(torch.square(transformed[:, m:] - complement)),
        }
        if "consistency" in batch:
            target = torch.from_numpy(np.asarray(batch["consistency"], np.float32))
            terms["consistency"] = torch.mean(torch.square(transformed - target))

        weights = dict(zip(("refusal", "harmfulness", "complement", "consistency"),
                           self.method.loss_weights, strict=True))  # fmt: skip
        total = sum(weights[name] * value for name, value in terms.items())
        values = {name: value.item() for name, value in terms.items()}
        return total, {"total": total.item(), **values}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Take one AdamW step on the batch and return the loss terms before the update.

        Args:
            batch: `input_ids`, `attention_mask`, `position_ids` `[batch, seq]`,
                `slot_positions` `[batch, P]`, `labels`, `refusal_logits`,
                `harmfulness_logits` `[batch]`, `complement` `[batch, d - m]` and, for L_m,
                `consistency` `[batch, d]`.

        Returns:
            The total and each term, as floats.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total, terms = self.loss(self.soft_prompt_states(batch), batch)
        total.backward()
        torch.nn.utils.clip_grad_norm_([self.soft_prompt], self.grad_clip)
        self.optimizer.step()
        return terms
