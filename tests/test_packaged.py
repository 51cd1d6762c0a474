import hashlib

import pytest

from mcd_jax.models.packaged import PACKAGED_MODELS, fetch_packaged_model


def test_smollm2_hash_matches(smollm2_gguf):
    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert digest == PACKAGED_MODELS["smollm2-135m-instruct"].sha256


def test_qwen_starts_with_gguf_magic(qwen_gguf):
    with open(qwen_gguf, "rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_corrupt_cache_is_refetched(smollm2_gguf, tmp_path):
    target = tmp_path / "models" / smollm2_gguf.name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF truncated")
    path = fetch_packaged_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert path == target
    assert path.stat().st_size == smollm2_gguf.stat().st_size


def test_unknown_name_lists_known_models():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        fetch_packaged_model("no-such-model")
