"""Soft-prompt initialisation and splicing against real tokenizers, embeddings and PEFT."""

import copy

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from test_chat import SHORT_PROMPT, load_gguf_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from mcd_jax import chat, soft_prompt

QUERIES = ["How do I bake bread?", "Explain how a bicycle gear train changes the pedalling effort."]
# Multi-byte characters and an emoji, whose bytes span several tokens.
GREEK_PROMPT = "Είσαι ένας χρήσιμος και ασφαλής βοηθός. 🙂"


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return load_gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_gguf):
    return load_gguf_tokenizer(qwen_gguf)


@pytest.fixture(scope="module")
def smollm2_embeddings(smollm2_gguf):
    """[vocab, d] SmolLM2 input embeddings, dequantised from the GGUF file."""
    reader = gguf.GGUFReader(str(smollm2_gguf))
    (tensor,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


@pytest.fixture(scope="module")
def bos_adding_tokenizer(smollm2_tokenizer):
    """A SmolLM2 tokenizer copy that adds BOS, as Llama tokenizers do."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_bos_token = True
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("name", ["smollm2", "qwen"])
@pytest.mark.parametrize("text_prompt", [SHORT_PROMPT, GREEK_PROMPT])
def test_slot_ids_reproduce_text_prompt(smollm2_tokenizer, qwen_tokenizer, name, text_prompt):
    tokenizer = {"smollm2": smollm2_tokenizer, "qwen": qwen_tokenizer}[name]
    ids = soft_prompt.text_prompt_token_ids(tokenizer, text_prompt)
    assert tokenizer.decode(ids) == text_prompt

    text_batch = chat.format_chat_batch(tokenizer, QUERIES, text_prompt=text_prompt)
    soft_batch = chat.format_chat_batch(tokenizer, QUERIES, soft_prompt_length=len(ids))
    spliced = soft_batch.input_ids.copy()
    spliced[np.arange(len(QUERIES))[:, None], soft_batch.slot_positions] = ids
    np.testing.assert_array_equal(spliced, text_batch.input_ids)
    np.testing.assert_array_equal(soft_batch.attention_mask, text_batch.attention_mask)
    np.testing.assert_array_equal(soft_batch.position_ids, text_batch.position_ids)


def test_init_splice_reproduces_embeddings(smollm2_tokenizer, smollm2_embeddings):
    ids = soft_prompt.text_prompt_token_ids(smollm2_tokenizer, SHORT_PROMPT)
    initial = soft_prompt.init_soft_prompt(smollm2_embeddings, ids)
    assert initial.shape == (len(ids), smollm2_embeddings.shape[1])
    assert initial.dtype == jnp.float32

    text_batch = chat.format_chat_batch(smollm2_tokenizer, QUERIES, text_prompt=SHORT_PROMPT)
    soft_batch = chat.format_chat_batch(smollm2_tokenizer, QUERIES, soft_prompt_length=len(ids))
    placeholder_embeds = jnp.asarray(smollm2_embeddings)[soft_batch.input_ids]
    spliced = soft_prompt.splice_soft_prompt(placeholder_embeds, initial, soft_batch.slot_positions)
    expected = smollm2_embeddings[text_batch.input_ids]
    np.testing.assert_array_equal(np.asarray(spliced), expected)


def test_qwen_keeps_first_token(qwen_tokenizer):
    assert qwen_tokenizer("You are")["input_ids"][0] != qwen_tokenizer.bos_token_id
    plain_ids = qwen_tokenizer(SHORT_PROMPT, add_special_tokens=False)["input_ids"]

    for placement in chat.PLACEMENTS:
        ids = soft_prompt.text_prompt_token_ids(qwen_tokenizer, SHORT_PROMPT, placement)
        assert ids == plain_ids
        assert qwen_tokenizer.decode(ids[:1]) == "You"


def test_prefix_ids_drop_bos(bos_adding_tokenizer):
    plain_ids = bos_adding_tokenizer(SHORT_PROMPT, add_special_tokens=False)["input_ids"]
    ids = soft_prompt.text_prompt_token_ids(bos_adding_tokenizer, SHORT_PROMPT, "prefix")
    assert ids == plain_ids
    assert bos_adding_tokenizer.bos_token_id not in ids


def test_leading_space_merges_with_template(smollm2_tokenizer):
    # SmolLM2's byte-level BPE joins "\n" from the template with the first space.
    with pytest.raises(ValueError, match="strip leading and trailing whitespace"):
        soft_prompt.text_prompt_token_ids(smollm2_tokenizer, "  " + SHORT_PROMPT)


def test_text_prompt_ids_bad_input(smollm2_tokenizer):
    with pytest.raises(ValueError, match="text_prompt='' is empty"):
        soft_prompt.text_prompt_token_ids(smollm2_tokenizer, "")
    with pytest.raises(ValueError, match="placement='suffix' is not one of"):
        soft_prompt.text_prompt_token_ids(smollm2_tokenizer, SHORT_PROMPT, "suffix")


def test_init_soft_prompt_bad_input():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(soft_prompt.init_soft_prompt(table, [3, 0]), table[[3, 0]])

    with pytest.raises(ValueError, match=r"shape \(12,\); expected \[vocab, d\]"):
        soft_prompt.init_soft_prompt(table.reshape(-1), [1])
    with pytest.raises(ValueError, match="non-empty list"):
        soft_prompt.init_soft_prompt(table, [])
    with pytest.raises(ValueError, match=r"outside the embedding table's vocabulary \[0, 4\)"):
        soft_prompt.init_soft_prompt(table, [1, 4])
    with pytest.raises(ValueError, match="outside"):
        soft_prompt.init_soft_prompt(table, [-1])


def splice_inputs(batch=2, seq=6, d=3, length=2):
    embeds = jnp.arange(batch * seq * d, dtype=jnp.float32).reshape(batch, seq, d)
    prompt = -1.0 - jnp.arange(length * d, dtype=jnp.float32).reshape(length, d)
    slots = jnp.array([[3, 4], [1, 2]], dtype=jnp.int32)
    return embeds, prompt, slots


def test_splice_writes_slots_only():
    embeds, prompt, slots = splice_inputs()
    spliced = jax.jit(soft_prompt.splice_soft_prompt)(embeds, prompt, slots)

    assert spliced.shape == embeds.shape
    np.testing.assert_array_equal(spliced[0, 3:5], prompt)
    np.testing.assert_array_equal(spliced[1, 1:3], prompt)
    untouched = np.ones((2, 6), dtype=bool)
    untouched[0, 3:5] = False
    untouched[1, 1:3] = False
    np.testing.assert_array_equal(np.asarray(spliced)[untouched], np.asarray(embeds)[untouched])


def test_splice_casts_to_embedding_dtype():
    embeds, prompt, slots = splice_inputs()
    spliced = soft_prompt.splice_soft_prompt(embeds.astype(jnp.bfloat16), prompt, slots)
    assert spliced.dtype == jnp.bfloat16


def test_splice_gradient_reaches_prompt():
    embeds, prompt, slots = splice_inputs()
    weights = jnp.linspace(0.5, 2.0, embeds.size).reshape(embeds.shape)

    def loss(soft):
        return jnp.sum(weights * soft_prompt.splice_soft_prompt(embeds, soft, slots))

    gradient = jax.jit(jax.grad(loss))(prompt)
    expected = weights[0, 3:5] + weights[1, 1:3]
    np.testing.assert_allclose(gradient, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("prompt_shape", "slot_shape", "message"),
    [
        ((2, 4), (2, 2), "width 4 but the embeddings have width 3"),
        ((2, 3, 1), (2, 2), r"soft_prompt has shape \(2, 3, 1\); expected \[P, d\]"),
        ((2, 3), (2, 3), r"slot_positions has shape \(2, 3\); expected \(batch, P\)"),
        ((2, 3), (4,), r"slot_positions has shape \(4,\); expected \[batch, P\]"),
    ],
)
def test_splice_bad_shapes(prompt_shape, slot_shape, message):
    embeds, _, _ = splice_inputs()
    prompt = jnp.zeros(prompt_shape, dtype=jnp.float32)
    slots = jnp.zeros(slot_shape, dtype=jnp.int32)
    with pytest.raises(ValueError, match=message):
        soft_prompt.splice_soft_prompt(embeds, prompt, slots)


def test_splice_rejects_embeds_rank():
    _, prompt, slots = splice_inputs()
    with pytest.raises(ValueError, match=r"inputs_embeds has shape \(6, 3\)"):
        soft_prompt.splice_soft_prompt(jnp.zeros((6, 3)), prompt, slots)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_soft_prompt(bad_value):
    embeds, prompt, slots = splice_inputs()
    prompt = prompt.at[1, 2].set(bad_value)
    with pytest.raises(ValueError, match=r"NaN or inf values in rows \[1\]"):
        soft_prompt.splice_soft_prompt(embeds, prompt, slots)
    with pytest.raises(ValueError, match="NaN or inf"):
        soft_prompt.check_soft_prompt(prompt, hidden_size=3)


def test_check_soft_prompt_shapes():
    soft_prompt.check_soft_prompt(np.zeros((2, 3), dtype=np.float32), hidden_size=3)
    with pytest.raises(ValueError, match="width 3 but the model's hidden size is 8"):
        soft_prompt.check_soft_prompt(np.zeros((2, 3)), hidden_size=8)
    with pytest.raises(ValueError, match=r"shape \(3,\); expected \[P, d\]"):
        soft_prompt.check_soft_prompt(np.zeros(3), hidden_size=3)
    with pytest.raises(ValueError, match="at least one row"):
        soft_prompt.check_soft_prompt(np.zeros((0, 3)), hidden_size=3)


def test_prefix_matches_peft_prompt_tuning(smollm2_tokenizer):
    """Prefix placement gives the logits of PEFT's PromptTuning on each unpadded query.

    PEFT puts its virtual tokens before an already left-padded batch and numbers
    positions 0..P+seq-1 across the padding, so a padded row's text positions
    depend on how much padding the batch needed. The prefix placement keeps the
    padding in front instead, so every row gets the positions PEFT gives it alone.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    length = 4
    peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=length)
    peft_model = get_peft_model(model, peft_config).eval()
    prompt = peft_model.get_prompt(batch_size=1)[0].detach().numpy()

    batch = chat.format_chat_batch(
        smollm2_tokenizer, QUERIES, soft_prompt_length=length, placement="prefix"
    )
    assert batch.lengths[0] < batch.lengths[1]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.from_numpy(batch.input_ids).long()).numpy()
        spliced = soft_prompt.splice_soft_prompt(
            jnp.asarray(embeds), jnp.asarray(prompt), jnp.asarray(batch.slot_positions)
        )
        ours = model(
            inputs_embeds=torch.from_numpy(np.array(spliced)),
            attention_mask=torch.from_numpy(batch.attention_mask).long(),
            position_ids=torch.from_numpy(batch.position_ids).long(),
        ).logits.numpy()

        for row, query in enumerate(QUERIES):
            ids = torch.tensor([chat.render_ids(smollm2_tokenizer, query, None)])
            reference = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            real = batch.lengths[row]
            assert reference.shape[1] == real
            np.testing.assert_allclose(ours[row, -real:], reference[0].numpy(), atol=1e-5)
