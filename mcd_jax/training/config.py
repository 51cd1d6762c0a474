"""The training job's configuration: a frozen dataclass tree that `mcd_jax.flags` fills in.

The defaults here are the defaults of the command-line flags. The loss weights, batch size,
epochs per language, learning rate, weight decay, clipping and seed are those of the MCD
reference implementation, and a flagfile per model overrides them. The flags check single
values (absl bounds and enums) and combinations while parsing. `TrainConfig.__post_init__` runs
the same checks, so a config built in Python fails the same way.

This module imports no JAX, so parsing flags stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mcd_jax.files import write_atomically

RESOLVED_CONFIG_FILE = "config.json"

DTYPES = ("bfloat16", "float32", "float16")
MODES = ("mcd", "dro")
ABLATIONS = ("none", "no_refusal", "no_harmfulness", "no_complement", "no_consistency")
CONSISTENCY_TARGETS = ("text_prompt", "soft_prompt")
# The values of `mcd_jax.chat.PLACEMENTS`, repeated so that this module does not import the chat
# formatting (and jinja2) just to parse flags. tests/training/test_config.py checks they match.
PLACEMENTS = ("system_slot", "prefix")
SCHEDULES = ("collaborative", "all_languages")
LABEL_DECODINGS = ("greedy", "sampled")

# Training languages of the MCD reference: the same queries in every language.
MCD_LANGUAGES = ("en", "da", "ko", "el", "ga")
# DRO, the single-language method MCD extends, trains on English only.
DRO_LANGUAGES = ("en",)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The frozen chat model.

    Attributes:
        ref: a Hugging Face hub id, a local folder or a packaged model name.
        dtype: the dtype of the frozen weights and activations (the soft prompt is float32).
        revision: a hub branch, tag or commit; None for the default branch.
    """

    ref: str
    dtype: str = "bfloat16"
    revision: str | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training and anchor data.

    Attributes:
        train_languages: language codes of the training data, in schedule order.
        anchor_languages: language codes of the anchor set used for estimation.
        dataset: "builtin", a benchmark registry name, or a path to a dataset folder or file.
        anchors_per_label: estimate from only the first this many harmful and the first this
            many harmless anchor queries; None uses them all.
    """

    train_languages: tuple[str, ...] = MCD_LANGUAGES
    anchor_languages: tuple[str, ...] = ("en",)
    dataset: str = "builtin"
    anchors_per_label: int | None = None


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The text prompt, the estimation's probes and the objective.

    Attributes:
        text_prompt: the text safety prompt in the system slot for text-prompt states:
            "default" or "short" for the built-in prompts, or the prompt text itself.
        soft_prompt_init_text: the text whose token embeddings initialise the soft prompt,
            in the same form as `text_prompt`; None to use `text_prompt`.
        num_components: PCA components m that span the safety subspace.
        probe_folds: cross-validation folds whose probes are averaged into one probe.
        weight_refusal: weight of the refusal term L_r.
        weight_harmfulness: weight of the harmfulness term L_h.
        weight_complement: weight of the complement term L_U.
        weight_consistency: weight of the cross-language consistency term L_m (MCD only).
        consistency_target: target of L_m: the other languages' text-prompt states or
            soft-prompt states.
        mode: "mcd" (all four terms) or "dro" (no L_m, English only).
        ablation: the term whose weight is set to 0, or "none".
        placement: where the soft prompt goes: the chat template's system slot, or a plain
            prefix before the chat-formatted query.
    """

    text_prompt: str = "default"
    soft_prompt_init_text: str | None = None
    num_components: int = 4
    probe_folds: int = 10
    weight_refusal: float = 1.0
    weight_harmfulness: float = 0.01
    weight_complement: float = 0.001
    weight_consistency: float = 0.001
    consistency_target: str = "text_prompt"
    mode: str = "mcd"
    ablation: str = "none"
    placement: str = "system_slot"

    def objective_config(self) -> Any:
        """Return the `mcd_jax.method.objective.ObjectiveConfig` of these settings."""
        from mcd_jax.method.objective import ObjectiveConfig

        dropped_term = None if self.ablation == "none" else self.ablation.removeprefix("no_")
        return ObjectiveConfig(
            refusal_weight=self.weight_refusal,
            harmfulness_weight=self.weight_harmfulness,
            complement_weight=self.weight_complement,
            consistency_weight=self.weight_consistency,
            consistency_target=self.consistency_target,
            mode=self.mode,
            dropped_term=dropped_term,
        )


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The language schedule and the optimizer.

    Attributes:
        schedule: "collaborative" (one language at a time, in `train_languages` order) or
            "all_languages" (every batch contains each query in every training language).
        batch_size: queries per batch (per language in "all_languages").
        epochs_per_language: epochs over each language's data ("collaborative"), or over the
            data in total ("all_languages").
        learning_rate: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: maximum global gradient norm; 0 disables clipping.
        seed: seed of the batch order and of every random draw.
        grad_accum_steps: micro-batches whose gradients are summed into one update.
        remat: recompute the frozen model's activations in the backward pass to save memory.
    """

    schedule: str = "collaborative"
    batch_size: int = 10
    epochs_per_language: int = 5
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 42
    grad_accum_steps: int = 1
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class EstimationConfig:
    """Refusal-label generation for the refusal probe.

    Attributes:
        label_samples: responses generated per (query, prompt condition).
        label_keep_longest: the longest responses kept per (query, condition) for the label.
        label_max_new_tokens: maximum new tokens per response.
        label_decoding: "sampled" (temperature 1.0, top-p 0.9, top-k 50) or "greedy".
        artifacts: a folder with a fitted transform and both probes to train with instead of
            running estimation (file names in `mcd_jax.training.job.ESTIMATION_ARTIFACT_FILES`);
            None runs or reuses the estimation stage in the work directory.
    """

    label_samples: int = 25
    label_keep_longest: int = 20
    label_max_new_tokens: int = 200
    label_decoding: str = "sampled"
    artifacts: str | None = None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; 0 lets the trainer choose the size.

    Attributes:
        data: data-parallel axis size.
        fsdp: axis size over which the frozen weights are sharded.
        tensor: tensor-parallel axis size.
    """

    data: int = 0
    fsdp: int = 0
    tensor: int = 0


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Arguments of `jax.distributed.initialize`; None lets JAX detect them (TPU, SLURM).

    Attributes:
        coordinator_address: `host:port` of process 0.
        num_processes: number of processes in the job.
        process_id: this process's index, from 0.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The work directory and checkpoints.

    Attributes:
        workdir: the run's work directory.
        save_every: steps between checkpoints.
        keep_checkpoints: number of most recent checkpoints kept.
        resume: continue from the latest checkpoint in `workdir`.
        force_resume: resume even if the work directory's fingerprint differs.
    """

    workdir: str
    save_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = True
    force_resume: bool = False


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Metrics and logs.

    Attributes:
        log_every: steps between summary log lines.
        tensorboard: write TensorBoard event files.
    """

    log_every: int = 10
    tensorboard: bool = True


# Inclusive lower bounds of numeric settings, by section and field. The flags use them as absl
# bounds, and `TrainConfig` checks them for configs built in Python.
LOWER_BOUNDS: dict[tuple[str, str], float] = {
    ("data", "anchors_per_label"): 1,
    ("method", "num_components"): 1,
    ("method", "probe_folds"): 2,
    ("method", "weight_refusal"): 0,
    ("method", "weight_harmfulness"): 0,
    ("method", "weight_complement"): 0,
    ("method", "weight_consistency"): 0,
    ("schedule", "batch_size"): 1,
    ("schedule", "epochs_per_language"): 1,
    ("schedule", "learning_rate"): 0,
    ("schedule", "weight_decay"): 0,
    ("schedule", "grad_clip"): 0,
    ("schedule", "seed"): 0,
    ("schedule", "grad_accum_steps"): 1,
    ("estimation", "label_samples"): 1,
    ("estimation", "label_keep_longest"): 1,
    ("estimation", "label_max_new_tokens"): 1,
    ("mesh", "data"): 0,
    ("mesh", "fsdp"): 0,
    ("mesh", "tensor"): 0,
    ("distributed", "num_processes"): 1,
    ("distributed", "process_id"): 0,
    ("checkpoint", "save_every"): 1,
    ("checkpoint", "keep_checkpoints"): 1,
    ("logging", "log_every"): 1,
}

# Allowed values of string settings, by section and field.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "dtype"): DTYPES,
    ("method", "consistency_target"): CONSISTENCY_TARGETS,
    ("method", "mode"): MODES,
    ("method", "ablation"): ABLATIONS,
    ("method", "placement"): PLACEMENTS,
    ("schedule", "schedule"): SCHEDULES,
    ("estimation", "label_decoding"): LABEL_DECODINGS,
}

_COORDINATOR_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is configured with; `config.json` in the work directory."""

    model: ModelSource
    data: DataConfig
    method: MethodConfig
    schedule: ScheduleConfig
    estimation: EstimationConfig
    mesh: MeshConfig
    distributed: DistributedConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig

    def __post_init__(self) -> None:
        problems = _single_value_problems(self) + cross_setting_problems(
            self.data, self.method, self.estimation, self.distributed
        )
        if problems:
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """Return the config as a JSON-compatible dict of sections."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> TrainConfig:
        """Build a config from the output of `to_json` (e.g. a work directory's config.json).

        Raises:
            ValueError: a section or field is missing or unknown, or a value is invalid.
        """
        sections = {}
        for field in dataclasses.fields(cls):
            if field.name not in payload:
                raise ValueError(f"invalid training configuration: section {field.name!r} missing")
            section_cls = _SECTION_TYPES[field.name]
            values = dict(payload[field.name])
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(values.keys() - known)
            if unknown:
                raise ValueError(
                    f"invalid training configuration: unknown fields {unknown} in section "
                    f"{field.name!r}; known fields are {sorted(known)}"
                )
            for name, value in values.items():
                if isinstance(value, list):
                    values[name] = tuple(value)
            sections[field.name] = section_cls(**values)
        return cls(**sections)


_SECTION_TYPES: dict[str, type] = {
    "model": ModelSource,
    "data": DataConfig,
    "method": MethodConfig,
    "schedule": ScheduleConfig,
    "estimation": EstimationConfig,
    "mesh": MeshConfig,
    "distributed": DistributedConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


def _single_value_problems(config: TrainConfig) -> list[str]:
    problems = []
    for (section, name), lower in LOWER_BOUNDS.items():
        value = getattr(getattr(config, section), name)
        if value is not None and value < lower:
            problems.append(f"{section}.{name}={value} is below its minimum {lower}")
    for (section, name), choices in CHOICES.items():
        value = getattr(getattr(config, section), name)
        if value not in choices:
            problems.append(f"{section}.{name}={value!r} is not one of {', '.join(choices)}")
    if not config.model.ref:
        problems.append("model.ref is empty: set --model to a hub id, folder or packaged name")
    if not config.method.text_prompt:
        problems.append("method.text_prompt is empty")
    if not config.checkpoint.workdir:
        problems.append("checkpoint.workdir is empty")
    return problems


def cross_setting_problems(
    data: DataConfig,
    method: MethodConfig,
    estimation: EstimationConfig,
    distributed: DistributedConfig,
) -> list[str]:
    """List the problems of combinations of settings, each naming the flags and a fix.

    Args:
        data: the data section.
        method: the method section.
        estimation: the estimation section.
        distributed: the multi-host section.

    Returns:
        One sentence per problem; empty when the combination is valid.
    """
    return (
        data_and_method_problems(data, method)
        + estimation_problems(estimation)
        + distributed_problems(distributed)
    )


def data_and_method_problems(data: DataConfig, method: MethodConfig) -> list[str]:
    """List the problems of the language lists and their fit with --mode and --ablation."""
    problems = []
    for flag, languages in (
        ("--train_languages", data.train_languages),
        ("--anchor_languages", data.anchor_languages),
    ):
        if not languages:
            problems.append(f"{flag} is empty; give at least one language code")
        duplicates = sorted({code for code in languages if languages.count(code) > 1})
        if duplicates:
            problems.append(f"{flag} lists {duplicates} more than once")

    if method.mode == "dro" and tuple(data.train_languages) != DRO_LANGUAGES:
        problems.append(
            f"--mode=dro trains on English only, but --train_languages="
            f"{','.join(data.train_languages)}; set --train_languages=en or use --mode=mcd"
        )
    if method.mode == "dro" and method.ablation == "no_consistency":
        problems.append(
            "--ablation=no_consistency has no effect with --mode=dro, which has no consistency "
            "term; use --ablation=none"
        )
    needs_other_languages = method.mode == "mcd" and method.ablation != "no_consistency"
    if needs_other_languages and len(data.train_languages) < 2:
        problems.append(
            "--mode=mcd needs at least 2 --train_languages, because the consistency term "
            "compares each language with the others; add languages, or use --mode=dro"
        )
    return problems


def estimation_problems(estimation: EstimationConfig) -> list[str]:
    """List the problems of the refusal-label settings taken together."""
    problems = []
    if estimation.label_keep_longest > estimation.label_samples:
        problems.append(
            f"--label_keep_longest={estimation.label_keep_longest} exceeds "
            f"--label_samples={estimation.label_samples}; lower it or raise --label_samples"
        )
    if estimation.label_decoding == "greedy" and estimation.label_samples > 1:
        problems.append(
            f"--label_decoding=greedy returns the same response every time, so "
            f"--label_samples={estimation.label_samples} repeats work; set --label_samples=1 "
            "and --label_keep_longest=1, or use --label_decoding=sampled"
        )
    return problems


def distributed_problems(distributed: DistributedConfig) -> list[str]:
    """List the problems of the multi-host settings taken together."""
    problems = []
    address = distributed.coordinator_address
    if address is not None and not _COORDINATOR_ADDRESS.match(address):
        problems.append(
            f"--coordinator_address={address!r} is not of the form host:port (e.g. node0:1234)"
        )
    num_processes, process_id = distributed.num_processes, distributed.process_id
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        problems.append(f"--process_id={process_id} must be below --num_processes={num_processes}")
    return problems


def default_run_name(model_ref: str, mode: str, schedule: str) -> str:
    """Name a run after its model, mode and schedule.

    For example `HuggingFaceTB/SmolLM2-135M-Instruct` trained with MCD and the collaborative
    schedule gives `SmolLM2-135M-Instruct-mcd-collaborative`.

    Args:
        model_ref: the --model value; only its last path component is used.
        mode: the --mode value.
        schedule: the --schedule value.

    Returns:
        A name made of letters, digits, `.`, `_` and `-`.
    """
    model_name = Path(model_ref.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model_name}-{mode}-{schedule}")


def ensure_writable_workdir(workdir: str | os.PathLike[str]) -> Path:
    """Create the work directory if needed and check that this process can write files in it.

    Args:
        workdir: the run's work directory.

    Returns:
        The work directory as an absolute path.

    Raises:
        ValueError: the directory cannot be created or is not writable.
    """
    path = Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(
            f"work directory {path} is not writable ({err}); choose another --workdir or fix "
            "its permissions"
        ) from err
    return path


def write_resolved_config(config: TrainConfig, workdir: str | os.PathLike[str]) -> Path:
    """Write `config` as JSON to `<workdir>/config.json`, replacing an earlier one atomically.

    Call it from process 0 only.

    Args:
        config: the resolved configuration of the run.
        workdir: the run's work directory; it must exist.

    Returns:
        The path of the written file.
    """
    path = Path(workdir) / RESOLVED_CONFIG_FILE
    return write_atomically(path, json.dumps(config.to_json(), indent=2) + "\n")


def read_resolved_config(workdir: str | os.PathLike[str]) -> TrainConfig:
    """Read the config that `write_resolved_config` wrote to `workdir`.

    Raises:
        FileNotFoundError: `workdir` has no config.json.
        ValueError: the file is not a valid configuration.
    """
    path = Path(workdir) / RESOLVED_CONFIG_FILE
    return TrainConfig.from_json(json.loads(path.read_text()))
