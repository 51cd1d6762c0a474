"""Builders shared by the step and trainer tests: a tiny model folder and estimation artifacts.

The tiny model is a random Qwen2 transformer with the SmolLM2 tokenizer's vocabulary, saved
with that tokenizer, so it has a real chat template and loads in well under a second. The
estimation artifacts are a transform fitted on the tiny model's own states and random probes,
written in the layout that `--estimation_artifacts` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from mcd_jax.method.probes import LinearProbe
from mcd_jax.method.transform import fit_transform
from mcd_jax.training.job import ESTIMATION_ARTIFACT_FILES

TEXT_PROMPT = "You are a helpful, respectful and honest assistant."
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_test.cfg"


def build_tiny_model_folder(tokenizer, folder: Path, seed: int = 0) -> Path:
    """Save a random 2-layer Qwen2 model (d = 64) and the tokenizer to `folder`."""
    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.08)
            if "norm" in name:
                parameter.add_(1.0)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_estimation_artifacts(states: np.ndarray, folder: Path, seed: int = 0) -> Path:
    """Fit a transform (m = 4) on `states` `[n, d]`, draw two probes and save all three."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    transform = fit_transform(states, num_components=4)
    transform.save(folder / ESTIMATION_ARTIFACT_FILES["transform"])
    for name in ("refusal_probe", "harmfulness_probe"):
        probe = LinearProbe(
            weight=rng.normal(size=4).astype(np.float32), bias=np.float32(rng.normal())
        )
        probe.save(folder / ESTIMATION_ARTIFACT_FILES[name])
    return folder
