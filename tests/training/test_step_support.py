"""Builders shared by the step and trainer tests: a tiny model folder and estimation artifacts.

The tiny model is a random Qwen2 transformer with the SmolLM2 tokenizer's vocabulary, saved
with that tokenizer, so it has a real chat template and loads in seconds. The
estimation artifacts are a transform fitted on the tiny model's own states and random probes,
written in the layout that `--estimation_artifacts` reads.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from mcd_jax.method.objective import precompute_text_prompt_cache
from mcd_jax.method.probes import LinearProbe
from mcd_jax.method.transform import fit_transform
from mcd_jax.soft_prompt import text_prompt_token_ids
from mcd_jax.training.data import BatchBuilder, HostCache, text_prompt_states
from mcd_jax.training.job import ESTIMATION_ARTIFACT_FILES
from mcd_jax.training.step import StepConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny_models import randomize_weights  # noqa: E402

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
    randomize_weights(model)
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


def write_small_dataset(path: Path, num_pairs: int, languages: tuple[str, ...]) -> Path:
    """Write the first `num_pairs` queries of the built-in training split as JSON Lines."""
    from mcd_jax.data.loaders import load_builtin

    examples = load_builtin("train", languages=list(languages))
    kept_ids = []
    for example in examples:
        if example.language == languages[0] and len(kept_ids) < num_pairs:
            kept_ids.append(example.pair_id)
    rows = [dataclasses.asdict(example) for example in examples if example.pair_id in set(kept_ids)]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def step_inputs(loaded, method, training_set, config: StepConfig, workdir: Path, mesh=None):
    """Build a `BatchBuilder` for `config`'s layout from real text-prompt states."""
    states = text_prompt_states(
        loaded.model,
        loaded.tokenizer,
        training_set,
        TEXT_PROMPT,
        workdir,
        model_id="tiny",
        mesh=mesh,
    )
    cache = precompute_text_prompt_cache(
        states,
        training_set.languages,
        method.transform,
        method.refusal_probe,
        method.harmfulness_probe,
    )
    return BatchBuilder(
        loaded.tokenizer,
        training_set,
        HostCache.from_cache(cache),
        layout=config.layout,
        soft_prompt_length=len(text_prompt_token_ids(loaded.tokenizer, TEXT_PROMPT)),
        include_consistency=not config.soft_prompt_targets,
        max_length=loaded.config.max_position_embeddings,
        mesh=mesh,
    )
