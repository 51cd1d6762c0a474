"""The fast GGUF header reader and the derived-metadata cache, against gguf and transformers."""

import gguf
import numpy as np
import pytest

from mcd_jax.models import gguf_cache
from mcd_jax.models.gguf_layout import GGUFFormatError, read_gguf_layout
from mcd_jax.models.packaged import PACKAGED_MODELS


def test_layout_matches_gguf_reader(smollm2_gguf):
    ours = read_gguf_layout(smollm2_gguf)
    reference = gguf.GGUFReader(str(smollm2_gguf))
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type
        assert mine.shape == tuple(int(n) for n in theirs.shape)
        assert mine.data.shape == theirs.data.shape
        assert mine.data.dtype == theirs.data.dtype
        np.testing.assert_array_equal(np.asarray(mine.data), np.asarray(theirs.data))
    assert ours.metadata["llama.block_count"] == 30
    assert ours.metadata["tokenizer.chat_template"].startswith("{% for message")


def test_truncated_tensor_data_rejected(smollm2_gguf, tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[:-4096])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_gguf_layout(truncated)


def test_truncated_header_rejected(smollm2_gguf, tmp_path):
    truncated = tmp_path / "header.gguf"
    with open(smollm2_gguf, "rb") as handle:
        truncated.write_bytes(handle.read(5000))
    with pytest.raises(GGUFFormatError, match="truncated|past the end"):
        read_gguf_layout(truncated)


def test_bad_magic_rejected(tmp_path):
    path = tmp_path / "not.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(GGUFFormatError, match="magic"):
        read_gguf_layout(path)


def test_metadata_cache_reused(smollm2_gguf, smollm2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("MCD_JAX_CACHE", str(tmp_path))
    sha256 = PACKAGED_MODELS["smollm2-135m-instruct"].sha256
    config, tokenizer = gguf_cache.gguf_config_and_tokenizer(smollm2_gguf, sha256)
    assert (tmp_path / "gguf" / sha256 / "complete").exists()

    def fail(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", _only_folders(fail))
    cached_config, cached_tokenizer = gguf_cache.gguf_config_and_tokenizer(smollm2_gguf, sha256)
    assert cached_config["hidden_size"] == config["hidden_size"] == 576
    assert cached_tokenizer.chat_template == smollm2_tokenizer.chat_template
    text = "Hello, κόσμε! 안녕하세요"
    assert cached_tokenizer(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]


def _only_folders(fail):
    """Wrap AutoConfig.from_pretrained so that a call with gguf_file fails the test."""
    import transformers

    original = transformers.AutoConfig.from_pretrained

    def wrapped(*args, **kwargs):
        if "gguf_file" in kwargs:
            fail()
        return original(*args, **kwargs)

    return wrapped
