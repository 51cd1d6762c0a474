"""The evaluation job: check settings, load the model and data, evaluate, write the report."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from mcd_jax.data.languages import canonical_language
from mcd_jax.evaluation.data import load_evaluation_examples
from mcd_jax.evaluation.protocol import (
    DECODINGS,
    DecodingProtocol,
    greedy_protocol,
    sampled_protocol,
)
from mcd_jax.evaluation.report import check_output_dir, report_payload, write_report
from mcd_jax.evaluation.runner import EvaluationResult, evaluate
from mcd_jax.evaluation.systems import (
    BUILTIN_SYSTEMS,
    DEFAULT_TEXT_PROMPT,
    EvaluatedSystem,
    builtin_system,
    load_soft_prompt_system,
)
from mcd_jax.judge import RefusalJudge
from mcd_jax.models.loading import LoadedModel, load_model
from mcd_jax.sharding import make_mesh

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Everything an evaluation run is configured with.

    Attributes:
      model: a model reference for `load_model` (folder, hub id, .gguf, "packaged:<name>").
      output_dir: the report folder.
      systems: systems without a soft prompt, from `BUILTIN_SYSTEMS`, in report order.
      soft_prompts: (display name, path) pairs, evaluated after `systems`.
      datasets: "builtin", benchmark names or file paths (see `load_evaluation_examples`).
      split: the dataset split.
      languages: language codes to keep; None keeps every language of the data.
      limit_per_language: the first N queries of each (language, label); None for all.
      data_dir: the local benchmark folder; None uses $MCD_JAX_DATA_DIR.
      trained_languages: overrides the soft prompts' recorded training languages.
      check_model_source: reject a soft prompt whose recorded weight sha256 or hub id
        differs from the model's (architecture, hidden size and chat template are
        always checked).
      decoding: "greedy" or "sampled" (the reference protocol).
      max_new_tokens: the maximum number of new tokens of greedy decoding.
      seed: the PRNG seed of sampled decoding.
      text_prompt: the text prompt of the "default" system.
      batch_size: rows per generation batch.
      dtype: "bfloat16" or "float32", the dtype of the frozen weights.
      revision: the hub revision of `model`.
      mesh: (data, fsdp, tensor) axis sizes; (1, 1, 1) runs on one device.
      overwrite: replace a report of different settings in `output_dir`.
    """

    model: str
    output_dir: str
    systems: tuple[str, ...] = BUILTIN_SYSTEMS
    soft_prompts: tuple[tuple[str, str], ...] = ()
    datasets: tuple[str, ...] = ("builtin",)
    split: str = "test"
    languages: tuple[str, ...] | None = None
    limit_per_language: int | None = None
    data_dir: str | None = None
    trained_languages: tuple[str, ...] | None = None
    check_model_source: bool = True
    decoding: str = "greedy"
    max_new_tokens: int = 64
    seed: int = 0
    text_prompt: str = DEFAULT_TEXT_PROMPT
    batch_size: int = 16
    dtype: str = "bfloat16"
    revision: str | None = None
    mesh: tuple[int, int, int] = (1, 1, 1)
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = []
        unknown = [name for name in self.systems if name not in BUILTIN_SYSTEMS]
        if unknown:
            problems.append(f"systems {unknown} are unknown; choose from {list(BUILTIN_SYSTEMS)}")
        names = list(self.systems) + [name for name, _ in self.soft_prompts]
        if not names:
            problems.append("no systems: give --systems or --soft_prompts")
        if len(set(names)) != len(names):
            problems.append(f"system names {names} repeat; give each soft prompt its own name")
        if self.decoding not in DECODINGS:
            problems.append(f"decoding={self.decoding!r} is not one of {list(DECODINGS)}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.limit_per_language is not None and self.limit_per_language < 1:
            problems.append(f"limit_per_language={self.limit_per_language} must be >= 1")
        for code in (self.languages or ()) + (self.trained_languages or ()):
            try:
                canonical_language(code)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError("invalid evaluation settings:\n  " + "\n  ".join(problems))

    def protocol(self) -> DecodingProtocol:
        """Build the decoding protocol these settings select."""
        if self.decoding == "sampled":
            return sampled_protocol(seed=self.seed)
        return greedy_protocol(self.max_new_tokens)

    def report_settings(self) -> dict[str, Any]:
        """Return the settings that determine a report's content (not batch size or mesh)."""
        settings = dataclasses.asdict(self)
        for key in ("output_dir", "batch_size", "mesh", "overwrite"):
            settings.pop(key)
        settings["soft_prompts"] = [
            [name, os.fspath(Path(path).expanduser().resolve())] for name, path in self.soft_prompts
        ]
        settings["protocol"] = self.protocol().to_json()
        return settings


def run_evaluation(
    config: EvaluationConfig, *, judge: RefusalJudge | None = None
) -> EvaluationResult:
    """Run the whole evaluation job and write report.json, report.md and report.png.

    Cheap checks come first (settings, output folder, soft prompt paths, data), so a
    wrong command line fails before the model is loaded.

    Args:
      config: the settings.
      judge: the refusal judge; defaults to `KeywordRefusalJudge()`.

    Returns:
      The evaluation result that the report was written from.

    Raises:
      ReportExistsError: the output folder contains a report of other settings.
      FileNotFoundError: a soft prompt, dataset file or model is missing.
      IncompatibleSoftPromptError: a soft prompt was trained for another model.
      ValueError: an invalid setting, dataset name or language.
    """
    settings = config.report_settings()
    output_dir = check_output_dir(config.output_dir, settings, config.overwrite)
    for name, path in config.soft_prompts:
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"soft prompt {name!r}: path {path!r} does not exist")
    examples = load_evaluation_examples(
        config.datasets,
        split=config.split,
        languages=config.languages,
        limit_per_language=config.limit_per_language,
        data_dir=config.data_dir,
    )

    mesh = None if config.mesh == (1, 1, 1) else make_mesh(*config.mesh)
    logging.info(
        "Loading model %s (%s) on %d device(s)", config.model, config.dtype, jax.device_count()
    )
    loaded = load_model(
        config.model, dtype=DTYPES[config.dtype], mesh=mesh, revision=config.revision
    )
    systems = build_systems(config, loaded)

    result = evaluate(
        loaded,
        systems,
        examples,
        protocol=config.protocol(),
        judge=judge,
        batch_size=config.batch_size,
        mesh=mesh,
    )
    if jax.process_index() == 0:
        write_report(report_payload(result, settings), output_dir)
    return result


def build_systems(config: EvaluationConfig, loaded: LoadedModel) -> list[EvaluatedSystem]:
    """Build the configured systems in report order: built-in ones, then soft prompts."""
    systems = [builtin_system(name, config.text_prompt) for name in config.systems]
    for name, path in config.soft_prompts:
        systems.append(
            load_soft_prompt_system(name, path, loaded, trained_languages=config.trained_languages)
        )
    return systems


def parse_soft_prompts(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Parse "name=path" items, e.g. ["MCD=runs/mcd", "DRO=exports/dro.safetensors"].

    Raises:
      ValueError: an item without "=", or with an empty name or path.
    """
    pairs = []
    for item in values:
        name, separator, path = item.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise ValueError(
                f"soft prompt {item!r} is not of the form name=path, e.g. MCD=runs/mcd/"
                "final_soft_prompt.npy"
            )
        pairs.append((name.strip(), path.strip()))
    return tuple(pairs)
