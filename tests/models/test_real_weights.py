"""Packaged GGUF chat models through our loader vs transformers' own GGUF loading.

transformers dequantizes the same GGUF file to float32 with the same `gguf` package, so
both sides hold identical float32 weights and differ only in float32 summation order.
Measured on SmolLM2-135M (30 layers, 3 chat prompts): max |logit diff| 1.1e-4 on logits
up to 40 in magnitude, i.e. a few float32 ulps per layer accumulated over 30 layers.
The tolerance of 1e-3 leaves about 10x headroom, yet a single wrong weight layout (e.g. q/k
rows left in llama.cpp's permuted order) moves logits by far more than 1.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mcd_jax.models import load_model

LOGIT_TOLERANCE = 1e-3
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about rain."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name three prime numbers."},
    ],
]

pytestmark = pytest.mark.slow


def _chat_batch(tokenizer, chats):
    """Left-padded chat-formatted prompts: ids, mask and positions [batch, seq]."""
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
    ]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=False)
    mask = encoded["attention_mask"]
    return encoded["input_ids"], mask, np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def _compare(gguf_ref, chats):
    """Load the model both ways and run the chats in float32.

    Returns:
      (the LoadedModel without its weights, our logits, reference logits, mask).
    """
    loaded = load_model(gguf_ref, dtype=jnp.float32)
    gguf_path = Path(loaded.source["path"])
    ids, mask, positions = _chat_batch(loaded.tokenizer, chats)
    ours = loaded.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_logits=True)
    ours_logits = np.asarray(ours.logits)
    loaded.model = None  # frees the float32 weights before transformers loads its copy

    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        reference_logits = reference(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    return loaded, ours_logits, reference_logits, mask


@pytest.fixture(scope="module")
def smollm2_run(smollm2_gguf):
    return _compare("packaged:smollm2-135m-instruct", CHATS)


def test_smollm2_logits_match_transformers(smollm2_run):
    _, ours, reference, mask = smollm2_run

    assert np.abs(ours - reference)[mask.astype(bool)].max() <= LOGIT_TOLERANCE


def test_smollm2_next_token_matches(smollm2_run):
    _, ours, reference, _ = smollm2_run

    np.testing.assert_array_equal(ours[:, -1].argmax(-1), reference[:, -1].argmax(-1))


def test_smollm2_source_records_gguf(smollm2_run, smollm2_gguf):
    loaded = smollm2_run[0]

    assert loaded.source["kind"] == "packaged"
    assert loaded.source["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loaded.source["path"] == str(smollm2_gguf)
    assert len(loaded.source["sha256"]) == 64
    assert loaded.config.tie_word_embeddings
    assert loaded.config.num_kv_heads == 3
    assert "<|im_start|>" in loaded.tokenizer.chat_template


def test_qwen_short_prompt_matches(qwen_gguf):
    _, ours, reference, mask = _compare(qwen_gguf, CHATS[:1])

    assert np.abs(ours - reference)[mask.astype(bool)].max() <= LOGIT_TOLERANCE
    np.testing.assert_array_equal(ours[:, -1].argmax(-1), reference[:, -1].argmax(-1))
