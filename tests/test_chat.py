"""Chat formatting against real tokenizers and their `apply_chat_template`.

SmolLM2 and Qwen2.5 use their own templates from the packaged GGUF files. The
other families use the small templates in tests/fixtures/templates/, set on a
copy of the SmolLM2 tokenizer with the family's control tokens added.
"""

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from mcd_jax import chat

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
CONTROL_TOKENS = [
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|end_of_turn|>",
    "<start_of_turn>",
    "<end_of_turn>",
]
SHORT_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe."
)
QUERIES = ["How do I bake bread?", "What is the capital of France? Answer in one word."]
# Families whose template renders a system message (in its own turn or folded into the
# first user turn), so `apply_chat_template([system, user])` is the reference.
SYSTEM_FAMILIES = ["llama2", "llama3", "vicuna", "openchat", "gemma"]


@functools.cache
def load_gguf_tokenizer(path: Path):
    """Load a GGUF tokenizer once per test process (test_soft_prompt.py reuses it)."""
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    return load_gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_gguf):
    return load_gguf_tokenizer(qwen_gguf)


@pytest.fixture(scope="session")
def family_tokenizers(smollm2_tokenizer):
    """One SmolLM2 tokenizer copy per fixture template, with its control tokens."""
    tokenizers = {}
    for template in sorted(TEMPLATES.glob("*.jinja")):
        tokenizer = copy.deepcopy(smollm2_tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": CONTROL_TOKENS})
        tokenizer.chat_template = template.read_text()
        tokenizers[template.stem] = tokenizer
    return tokenizers


@pytest.fixture
def real_tokenizers(smollm2_tokenizer, qwen_tokenizer):
    return {"smollm2": smollm2_tokenizer, "qwen2.5": qwen_tokenizer}


def reference_ids(tokenizer, messages, add_generation_prompt=True):
    encoding = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoding["input_ids"])


def system_and_user(text_prompt, query):
    return [{"role": "system", "content": text_prompt}, {"role": "user", "content": query}]


def real_ids(batch, row):
    return list(batch.input_ids[row, batch.attention_mask[row] == 1])


def check_slot_round_trip(tokenizer, reference_messages):
    """Check text-prompt ids, the slot's decoding, and placeholder-to-text equality."""
    text_batch = chat.format_chat_batch(tokenizer, QUERIES, text_prompt=SHORT_PROMPT)
    for row, query in enumerate(QUERIES):
        assert real_ids(text_batch, row) == reference_ids(tokenizer, reference_messages(query))

        split = chat.split_at_system_slot(tokenizer, query, SHORT_PROMPT)
        assert tokenizer.decode(split.slot).strip() == SHORT_PROMPT
        assert split.before + split.slot + split.after == real_ids(text_batch, row)

    length = len(chat.split_at_system_slot(tokenizer, QUERIES[0], SHORT_PROMPT).slot)
    soft_batch = chat.format_chat_batch(tokenizer, QUERIES, soft_prompt_length=length)
    assert soft_batch.input_ids.shape == text_batch.input_ids.shape
    for row, query in enumerate(QUERIES):
        slot = soft_batch.slot_positions[row]
        assert np.all(soft_batch.input_ids[row, slot] == soft_batch.pad_id)
        assert np.all(soft_batch.attention_mask[row, slot] == 1)

        spliced = soft_batch.input_ids[row].copy()
        spliced[slot] = chat.split_at_system_slot(tokenizer, query, SHORT_PROMPT).slot
        np.testing.assert_array_equal(spliced, text_batch.input_ids[row])


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5"])
def test_real_template_slot(real_tokenizers, name):
    check_slot_round_trip(real_tokenizers[name], lambda query: system_and_user(SHORT_PROMPT, query))


@pytest.mark.parametrize("family", SYSTEM_FAMILIES)
def test_family_template_slot(family_tokenizers, family):
    tokenizer = family_tokenizers[family]
    assert chat.system_slot_location(tokenizer) is chat.SlotLocation.SYSTEM_MESSAGE
    check_slot_round_trip(tokenizer, lambda query: system_and_user(SHORT_PROMPT, query))


def test_mistral_system_in_user_turn(family_tokenizers):
    tokenizer = family_tokenizers["mistral_v01"]
    with pytest.raises(TemplateError, match="roles must alternate"):
        tokenizer.apply_chat_template(system_and_user(SHORT_PROMPT, "hi"), tokenize=False)

    assert chat.system_slot_location(tokenizer) is chat.SlotLocation.FIRST_USER_TURN
    check_slot_round_trip(
        tokenizer,
        lambda query: [{"role": "user", "content": SHORT_PROMPT + "\n\n" + query}],
    )


def test_bos_written_once(family_tokenizers):
    tokenizer = family_tokenizers["llama2"]
    batch = chat.format_chat_batch(tokenizer, QUERIES[:1], text_prompt=SHORT_PROMPT)
    ids = real_ids(batch, 0)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


def test_no_system_prompt_follows_template(qwen_tokenizer):
    batch = chat.format_chat_batch(qwen_tokenizer, QUERIES[:1])
    ids = real_ids(batch, 0)
    assert ids == reference_ids(qwen_tokenizer, [{"role": "user", "content": QUERIES[0]}])
    assert "You are Qwen, created by Alibaba Cloud" in qwen_tokenizer.decode(ids)
    assert batch.slot_positions is None


def test_without_generation_prompt(smollm2_tokenizer):
    batch = chat.format_chat_batch(
        smollm2_tokenizer, QUERIES[:1], text_prompt=SHORT_PROMPT, add_generation_prompt=False
    )
    messages = system_and_user(SHORT_PROMPT, QUERIES[0])
    assert real_ids(batch, 0) == reference_ids(smollm2_tokenizer, messages, False)
    assert not smollm2_tokenizer.decode(real_ids(batch, 0)).endswith("assistant\n")


def test_left_padding_layout(smollm2_tokenizer):
    queries = ["Hi", "Explain in detail how a bicycle gear train changes the pedalling effort."]
    batch = chat.format_chat_batch(smollm2_tokenizer, queries, soft_prompt_length=4)
    short, long = (len(reference_ids(smollm2_tokenizer, system_and_user("x", q))) for q in queries)
    # "x" is one token, so each row is its reference length minus 1 plus 4 soft-prompt rows.
    expected_lengths = [short + 3, long + 3]
    seq = max(expected_lengths)

    assert batch.input_ids.shape == (2, seq)
    assert batch.input_ids.dtype == np.int32
    assert batch.attention_mask.dtype == np.int32
    assert batch.position_ids.dtype == np.int32
    assert batch.slot_positions.dtype == np.int32
    assert list(batch.lengths) == expected_lengths
    pads = seq - expected_lengths[0]
    assert pads > 0
    assert list(batch.attention_mask[0]) == [0] * pads + [1] * expected_lengths[0]
    assert np.all(batch.input_ids[0, :pads] == batch.pad_id)
    assert list(batch.position_ids[0]) == [0] * pads + list(range(expected_lengths[0]))
    assert list(batch.attention_mask[1]) == [1] * seq
    assert list(batch.position_ids[1]) == list(range(seq))
    # The slot starts after "<|im_start|>system\n" (3 tokens) in both rows.
    assert list(batch.slot_positions[1]) == [3, 4, 5, 6]
    assert list(batch.slot_positions[0]) == [pads + 3, pads + 4, pads + 5, pads + 6]


def test_padding_multiple_and_buckets(smollm2_tokenizer):
    longest = int(chat.format_chat_batch(smollm2_tokenizer, QUERIES).lengths.max())

    batch = chat.format_chat_batch(smollm2_tokenizer, QUERIES, pad_to_multiple_of=16)
    assert batch.input_ids.shape[1] == -(-longest // 16) * 16

    batch = chat.format_chat_batch(
        smollm2_tokenizer, QUERIES, bucket_lengths=[longest - 1, longest + 5, longest + 40]
    )
    assert batch.input_ids.shape[1] == longest + 5

    with pytest.raises(ValueError, match=f"longest row has {longest} tokens"):
        chat.format_chat_batch(smollm2_tokenizer, QUERIES, bucket_lengths=[longest - 1])

    capped = chat.format_chat_batch(
        smollm2_tokenizer, QUERIES, pad_to_multiple_of=1024, max_length=longest + 2
    )
    assert capped.input_ids.shape[1] == longest + 2


def test_query_longer_than_context(smollm2_tokenizer):
    lengths = chat.format_chat_batch(smollm2_tokenizer, QUERIES).lengths
    limit = int(lengths[0])
    assert lengths[1] > limit
    message = f"Query 1 is {int(lengths[1])} tokens long .* max_length={limit}"
    with pytest.raises(ValueError, match=message):
        chat.format_chat_batch(smollm2_tokenizer, QUERIES, max_length=limit)


def test_prefix_placement_layout(smollm2_tokenizer):
    queries = ["Hi", QUERIES[1]]
    batch = chat.format_chat_batch(
        smollm2_tokenizer, queries, soft_prompt_length=5, placement="prefix"
    )
    texts = [reference_ids(smollm2_tokenizer, [{"role": "user", "content": q}]) for q in queries]
    seq = 5 + len(texts[1])
    pads = seq - (5 + len(texts[0]))

    assert batch.input_ids.shape == (2, seq)
    assert list(batch.slot_positions[1]) == [0, 1, 2, 3, 4]
    assert list(batch.position_ids[1]) == list(range(seq))
    assert real_ids(batch, 1) == [batch.pad_id] * 5 + texts[1]
    # Padding goes before the prefix, so the prefix stays next to its text.
    assert list(batch.slot_positions[0]) == [pads + i for i in range(5)]
    assert list(batch.attention_mask[0]) == [0] * pads + [1] * (seq - pads)
    assert list(batch.position_ids[0]) == [0] * pads + list(range(seq - pads))
    assert real_ids(batch, 0) == [batch.pad_id] * 5 + texts[0]


def test_no_chat_template(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None
    tokenizer.name_or_path = "plain-base-model"
    with pytest.raises(
        ValueError, match="'plain-base-model' has no chat template.*chat_template ="
    ):
        chat.format_chat_batch(tokenizer, QUERIES, soft_prompt_length=3)


def test_template_dropping_system(family_tokenizers):
    with pytest.raises(ValueError, match="drops the system message"):
        chat.format_chat_batch(family_tokenizers["drops_system"], QUERIES, soft_prompt_length=3)


def test_template_repeating_system(family_tokenizers):
    with pytest.raises(ValueError, match="does not appear exactly once"):
        chat.format_chat_batch(family_tokenizers["repeats_system"], QUERIES, soft_prompt_length=3)


@pytest.mark.parametrize("queries", [["ok", ""], ["ok", "  \n"]])
def test_empty_query(smollm2_tokenizer, queries):
    with pytest.raises(ValueError, match="Query 1 is empty"):
        chat.format_chat_batch(smollm2_tokenizer, queries)


def test_no_queries(smollm2_tokenizer):
    with pytest.raises(ValueError, match="queries is empty"):
        chat.format_chat_batch(smollm2_tokenizer, [])
    with pytest.raises(ValueError, match="not one string"):
        chat.format_chat_batch(smollm2_tokenizer, "How do I bake bread?")


@pytest.mark.parametrize("length", [0, -2, True, 2.0])
def test_bad_soft_prompt_length(smollm2_tokenizer, length):
    with pytest.raises(ValueError, match="soft_prompt_length"):
        chat.format_chat_batch(smollm2_tokenizer, QUERIES, soft_prompt_length=length)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"text_prompt": "Be safe.", "soft_prompt_length": 3}, "not both"),
        ({"text_prompt": " "}, "text_prompt=None for no system prompt"),
        ({"placement": "prefix"}, "pass soft_prompt_length"),
        ({"placement": "suffix", "soft_prompt_length": 3}, "placement='suffix' is not one of"),
        ({"pad_to_multiple_of": 8, "bucket_lengths": [64]}, "not both"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of=0"),
        ({"bucket_lengths": []}, "bucket_lengths="),
        ({"max_length": 0}, "max_length=0 must be at least 1"),
    ],
)
def test_conflicting_options(smollm2_tokenizer, options, message):
    with pytest.raises(ValueError, match=message):
        chat.format_chat_batch(smollm2_tokenizer, QUERIES, **options)
