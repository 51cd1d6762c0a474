"""Generation against transformers' `generate`, on tiny random models and on SmolLM2.

Greedy decoding in float32 must give the same tokens as the PyTorch model. The
queries mix short and long ones, so left padding is exercised.
"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mcd_jax import generation
from mcd_jax.chat import format_chat_batch
from mcd_jax.generation import default_stop_token_ids, generate
from mcd_jax.models import load_model
from mcd_jax.sampling import SamplingConfig
from mcd_jax.sharding import make_mesh
from mcd_jax.soft_prompt import init_soft_prompt, text_prompt_token_ids

sys.path.insert(0, str(Path(__file__).parent / "models"))
from tiny_models import make_torch_model  # noqa: E402

QUERIES = [
    "Hi",
    "Tell me a long story about a cat that travelled to the moon and came back with a rock.",
    "What is 2+2?",
    "Name three colours.",
    "Write one sentence about the sea, please.",
]
TEXT_PROMPT = "You are a helpful assistant. Answer briefly."


def _tiny_pair(variant: str, tokenizer, folder: Path):
    """Build a random PyTorch model with the tokenizer's vocabulary; load it in JAX."""
    torch_model = make_torch_model(variant, vocab_size=len(tokenizer), max_position_embeddings=256)
    torch_model.save_pretrained(folder)
    return torch_model, load_model(folder, dtype=jnp.float32).model


def _reference_tokens(torch_model, tokenizer, queries, max_new_tokens, stop_ids, **format_kwargs):
    """Greedy tokens from transformers, cut after the first stop token."""
    batch = format_chat_batch(tokenizer, queries, **format_kwargs)
    with torch.no_grad():
        output = torch_model.generate(
            torch.tensor(batch.input_ids, dtype=torch.long),
            attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=batch.pad_id,
        )
    rows = []
    for row in output[:, batch.input_ids.shape[1] :].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize(
    "variant", ["llama_untied_gqa", "mistral_sliding_window", "qwen2_qkv_bias"]
)
def test_greedy_matches_transformers_tiny(variant, smollm2_tokenizer, tmp_path):
    torch_model, model = _tiny_pair(variant, smollm2_tokenizer, tmp_path)
    stop_ids = default_stop_token_ids(smollm2_tokenizer)
    sampling = SamplingConfig(max_new_tokens=10, stop_token_ids=stop_ids)

    ours = generate(
        model, smollm2_tokenizer, QUERIES, sampling=sampling, text_prompt=TEXT_PROMPT, batch_size=8
    )
    expected = _reference_tokens(
        torch_model, smollm2_tokenizer, QUERIES, 10, stop_ids, text_prompt=TEXT_PROMPT
    )
    assert ours.token_ids == expected


def test_last_state_matches_transformers(smollm2_tokenizer, tmp_path):
    torch_model, model = _tiny_pair("qwen2_qkv_bias", smollm2_tokenizer, tmp_path)
    batch = format_chat_batch(smollm2_tokenizer, QUERIES, text_prompt=TEXT_PROMPT)

    ours = model(
        jnp.asarray(batch.input_ids),
        attention_mask=jnp.asarray(batch.attention_mask),
        position_ids=jnp.asarray(batch.position_ids),
    ).hidden_states[:, -1]
    with torch.no_grad():
        reference = torch_model(
            input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
            attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
            output_hidden_states=True,
        ).hidden_states[-1][:, -1]
    np.testing.assert_allclose(np.asarray(ours), reference.numpy(), atol=1e-4, rtol=0)


def _last_states(model, tokenizer, queries, soft_prompt=None, **format_kwargs):
    batch = format_chat_batch(tokenizer, queries, **format_kwargs)
    embeds = model.embed(jnp.asarray(batch.input_ids))
    if soft_prompt is not None:
        rows = jnp.arange(len(queries))[:, None]
        embeds = embeds.at[rows, jnp.asarray(batch.slot_positions)].set(soft_prompt)
    output = model(
        inputs_embeds=embeds,
        attention_mask=jnp.asarray(batch.attention_mask),
        position_ids=jnp.asarray(batch.position_ids),
    )
    return np.asarray(output.hidden_states[:, -1])


def test_soft_prompt_from_text_reproduces_text(smollm2_tokenizer, tmp_path):
    _, model = _tiny_pair("llama_untied_gqa", smollm2_tokenizer, tmp_path)
    token_ids = text_prompt_token_ids(smollm2_tokenizer, TEXT_PROMPT)
    soft_prompt = init_soft_prompt(model.embed_tokens[...], token_ids)

    text_states = _last_states(model, smollm2_tokenizer, QUERIES, text_prompt=TEXT_PROMPT)
    soft_states = _last_states(
        model, smollm2_tokenizer, QUERIES, soft_prompt, soft_prompt_length=len(token_ids)
    )
    np.testing.assert_array_equal(soft_states, text_states)

    sampling = SamplingConfig(
        max_new_tokens=8, stop_token_ids=default_stop_token_ids(smollm2_tokenizer)
    )
    text_run = generate(
        model, smollm2_tokenizer, QUERIES, sampling=sampling, text_prompt=TEXT_PROMPT
    )
    soft_run = generate(
        model, smollm2_tokenizer, QUERIES, sampling=sampling, soft_prompt=soft_prompt
    )
    assert soft_run.token_ids == text_run.token_ids


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer, tmp_path_factory):
    return _tiny_pair("llama_untied_gqa", smollm2_tokenizer, tmp_path_factory.mktemp("tiny"))[1]


def test_same_seed_same_text(tiny_llama, smollm2_tokenizer):
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    first = generate(tiny_llama, smollm2_tokenizer, QUERIES, sampling=sampling)
    second = generate(tiny_llama, smollm2_tokenizer, QUERIES, sampling=sampling)
    other_seed = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=4)
    third = generate(tiny_llama, smollm2_tokenizer, QUERIES, sampling=other_seed)
    assert first.texts == second.texts
    assert first.token_ids != third.token_ids


def test_top_k_one_equals_greedy(tiny_llama, smollm2_tokenizer):
    greedy = generate(
        tiny_llama, smollm2_tokenizer, QUERIES, sampling=SamplingConfig(max_new_tokens=8)
    )
    top_one = generate(
        tiny_llama,
        smollm2_tokenizer,
        QUERIES,
        sampling=SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=1, seed=9),
    )
    assert top_one.token_ids == greedy.token_ids


def test_rows_stop_independently(tiny_llama, smollm2_tokenizer):
    greedy = generate(
        tiny_llama, smollm2_tokenizer, QUERIES, sampling=SamplingConfig(max_new_tokens=6)
    )
    # Make the second token of row 0 a stop token: only row 0 must end there.
    stop_id = greedy.token_ids[0][1]
    stopping = SamplingConfig(max_new_tokens=6, stop_token_ids=(stop_id,))
    result = generate(tiny_llama, smollm2_tokenizer, QUERIES, sampling=stopping)
    assert result.token_ids[0] == greedy.token_ids[0][:2]
    assert result.stopped[0]
    for row in range(1, len(QUERIES)):
        cut = next(
            (i + 1 for i, t in enumerate(greedy.token_ids[row]) if t == stop_id),
            len(greedy.token_ids[row]),
        )
        assert result.token_ids[row] == greedy.token_ids[row][:cut]


def test_min_new_tokens_delays_stop(tiny_llama, smollm2_tokenizer):
    greedy = generate(
        tiny_llama, smollm2_tokenizer, QUERIES[:1], sampling=SamplingConfig(max_new_tokens=6)
    )
    stop_id = greedy.token_ids[0][0]
    delayed = SamplingConfig(max_new_tokens=6, min_new_tokens=3, stop_token_ids=(stop_id,))
    result = generate(tiny_llama, smollm2_tokenizer, QUERIES[:1], sampling=delayed)
    assert len(result.token_ids[0]) >= 3
    assert stop_id not in result.token_ids[0][:3]


def test_compiles_once_per_bucket(tiny_llama, smollm2_tokenizer):
    sampling = SamplingConfig(max_new_tokens=4)
    generation._generate_jit.clear_cache()
    generate(tiny_llama, smollm2_tokenizer, ["Hi", "Hello there"], sampling=sampling, batch_size=2)
    generate(tiny_llama, smollm2_tokenizer, ["Good day", "Yo"], sampling=sampling, batch_size=2)
    generate(tiny_llama, smollm2_tokenizer, ["A", "B", "C"], sampling=sampling, batch_size=2)
    assert generation._generate_jit._cache_size() == 1


def test_mesh_matches_single_device(tiny_llama, smollm2_tokenizer, tmp_path):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sampling = SamplingConfig(max_new_tokens=6)
    single = generate(tiny_llama, smollm2_tokenizer, QUERIES, sampling=sampling, batch_size=4)
    _tiny_pair("llama_untied_gqa", smollm2_tokenizer, tmp_path)
    sharded_model = load_model(tmp_path, dtype=jnp.float32, mesh=mesh).model
    sharded = generate(
        sharded_model, smollm2_tokenizer, QUERIES, sampling=sampling, batch_size=4, mesh=mesh
    )
    assert sharded.token_ids == single.token_ids
    assert len(sharded_model.embed_tokens[...].sharding.device_set) == 8


def test_bad_inputs(tiny_llama, smollm2_tokenizer):
    sampling = SamplingConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_llama, smollm2_tokenizer, ["Hi", "  "], sampling=sampling)
    with pytest.raises(ValueError, match="longer than|max_length|context"):
        generate(tiny_llama, smollm2_tokenizer, ["word " * 300], sampling=sampling)
    with pytest.raises(ValueError, match="64"):
        generate(
            tiny_llama, smollm2_tokenizer, ["Hi"], sampling=sampling, soft_prompt=np.zeros((3, 32))
        )
    with pytest.raises(ValueError, match="not both"):
        generate(
            tiny_llama,
            smollm2_tokenizer,
            ["Hi"],
            sampling=sampling,
            text_prompt="Be nice.",
            soft_prompt=np.zeros((3, 64)),
        )
    with pytest.raises(ValueError, match="multiple"):
        generate(
            tiny_llama,
            smollm2_tokenizer,
            ["Hi"],
            sampling=sampling,
            batch_size=3,
            mesh=make_mesh(data=2, fsdp=2, tensor=2),
        )


def test_tokenizer_without_template(tiny_llama, smollm2_tokenizer):
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=smollm2_tokenizer.backend_tokenizer
    )
    with pytest.raises(ValueError, match="chat template"):
        generate(tiny_llama, tokenizer, ["Hi"], sampling=SamplingConfig(max_new_tokens=2))


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_gguf, smollm2_tokenizer):
    model = load_model(smollm2_gguf, dtype=jnp.float32).model
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    stop_ids = default_stop_token_ids(smollm2_tokenizer)
    queries = QUERIES[:4]
    sampling = SamplingConfig(max_new_tokens=16, stop_token_ids=stop_ids)
    ours = generate(model, smollm2_tokenizer, queries, sampling=sampling, batch_size=4)
    expected = _reference_tokens(torch_model, smollm2_tokenizer, queries, 16, stop_ids)
    assert ours.token_ids == expected
    assert all(text.strip() for text in ours.texts)
