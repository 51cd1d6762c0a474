"""`h(x)` from `compute_states` against transformers' last hidden state."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mcd_jax.chat import format_chat_batch
from mcd_jax.sharding import make_mesh
from mcd_jax.soft_prompt import init_soft_prompt, text_prompt_token_ids
from mcd_jax.states import compute_states

sys.path.insert(0, str(Path(__file__).parent))
from test_generation import QUERIES, TEXT_PROMPT, _tiny_pair  # noqa: E402


@pytest.fixture(scope="module")
def tiny_qwen(smollm2_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen")
    torch_model, model = _tiny_pair("qwen2_qkv_bias", smollm2_tokenizer, folder)
    return torch_model, model, folder


def test_states_match_transformers(tiny_qwen, smollm2_tokenizer):
    torch_model, model, _ = tiny_qwen
    ours = compute_states(model, smollm2_tokenizer, QUERIES, text_prompt=TEXT_PROMPT, batch_size=4)

    batch = format_chat_batch(smollm2_tokenizer, QUERIES, text_prompt=TEXT_PROMPT)
    with torch.no_grad():
        reference = torch_model(
            input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
            attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
            output_hidden_states=True,
        ).hidden_states[-1][:, -1]
    assert ours.shape == (len(QUERIES), 64)
    np.testing.assert_allclose(ours, reference.numpy(), atol=1e-4, rtol=0)


def test_soft_prompt_states_equal_text_states(tiny_qwen, smollm2_tokenizer):
    _, model, _ = tiny_qwen
    token_ids = text_prompt_token_ids(smollm2_tokenizer, TEXT_PROMPT)
    soft_prompt = init_soft_prompt(model.embed_tokens[...], token_ids)
    text_states = compute_states(model, smollm2_tokenizer, QUERIES, text_prompt=TEXT_PROMPT)
    soft_states = compute_states(model, smollm2_tokenizer, QUERIES, soft_prompt=soft_prompt)
    np.testing.assert_array_equal(soft_states, text_states)


def test_states_under_mesh(tiny_qwen, smollm2_tokenizer):
    _, model, folder = tiny_qwen
    from mcd_jax.models import load_model

    mesh = make_mesh(data=4, fsdp=2, tensor=1)
    sharded = load_model(folder, dtype=jnp.float32, mesh=mesh).model
    single = compute_states(model, smollm2_tokenizer, QUERIES, batch_size=8)
    parallel = compute_states(sharded, smollm2_tokenizer, QUERIES, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(parallel, single, atol=1e-5, rtol=0)


def test_both_prompts_rejected(tiny_qwen, smollm2_tokenizer):
    _, model, _ = tiny_qwen
    with pytest.raises(ValueError, match="not both"):
        compute_states(
            model, smollm2_tokenizer, ["Hi"], text_prompt="Be nice.", soft_prompt=np.zeros((2, 64))
        )
