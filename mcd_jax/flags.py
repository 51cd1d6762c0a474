"""Command-line flags of the training job, defined in one place and grouped by concern.

A launch script imports this module (which defines the flags on `absl.flags.FLAGS`), marks the
flags it needs as required and turns the parsed flags into a `TrainConfig`:

    from absl import app
    from mcd_jax import flags as mcd_flags

    def main(argv):
        config = mcd_flags.config_from_flags()
        ...

    if __name__ == "__main__":
        mcd_flags.mark_required_train_flags()
        app.run(main)

absl checks each value's range and enum while parsing, and a validator over all flags checks the
combinations (`mcd_jax.training.config.cross_setting_problems`), so a bad command line fails with
"FATAL Flags parsing error" before any work starts. Defaults come from the dataclasses in
`mcd_jax.training.config`. A flagfile (`--flagfile=configs/<model>.cfg`) contains one `--name=value`
per line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import app, flags

from mcd_jax.data.languages import canonical_language
from mcd_jax.training import config as config_lib

FLAGS = flags.FLAGS

_MODEL = config_lib.ModelSource(ref="")
_DATA = config_lib.DataConfig()
_METHOD = config_lib.MethodConfig()
_SCHEDULE = config_lib.ScheduleConfig()
_ESTIMATION = config_lib.EstimationConfig()
_MESH = config_lib.MeshConfig()
_DISTRIBUTED = config_lib.DistributedConfig()
_CHECKPOINT = config_lib.CheckpointConfig(workdir="")
_LOGGING = config_lib.LoggingConfig()

# Flag name -> (config section, field). Flags missing here are resolved by config_from_flags.
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("model", "ref"),
    "dtype": ("model", "dtype"),
    "revision": ("model", "revision"),
    "anchor_languages": ("data", "anchor_languages"),
    "dataset": ("data", "dataset"),
    "anchors_per_label": ("data", "anchors_per_label"),
    **{
        name: ("method", name)
        for name in (
            "text_prompt",
            "soft_prompt_init_text",
            "num_components",
            "probe_folds",
            "weight_refusal",
            "weight_harmfulness",
            "weight_complement",
            "weight_consistency",
            "consistency_target",
            "mode",
            "ablation",
            "placement",
        )
    },
    **{f.name: ("schedule", f.name) for f in dataclasses.fields(config_lib.ScheduleConfig)},
    **{
        f.name: ("estimation", f.name)
        for f in dataclasses.fields(config_lib.EstimationConfig)
        if f.name != "artifacts"
    },
    "estimation_artifacts": ("estimation", "artifacts"),
    **{f"mesh_{f.name}": ("mesh", f.name) for f in dataclasses.fields(config_lib.MeshConfig)},
    **{f.name: ("distributed", f.name) for f in dataclasses.fields(config_lib.DistributedConfig)},
    "save_every": ("checkpoint", "save_every"),
    "keep_checkpoints": ("checkpoint", "keep_checkpoints"),
    "resume": ("checkpoint", "resume"),
    "force_resume": ("checkpoint", "force_resume"),
    **{f.name: ("logging", f.name) for f in dataclasses.fields(config_lib.LoggingConfig)},
}


def _bounds(flag_name: str) -> dict[str, float]:
    section, field = FLAG_FIELDS[flag_name]
    return {"lower_bound": config_lib.LOWER_BOUNDS[(section, field)]}


def _choices(flag_name: str) -> list[str]:
    section, field = FLAG_FIELDS[flag_name]
    return list(config_lib.CHOICES[(section, field)])


def _define_model_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "model",
        None,
        "Chat model to protect: a Hugging Face hub id, a local folder with config.json and "
        "weights, or a packaged model name. Required for training.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "dtype",
        _MODEL.dtype,
        _choices("dtype"),
        "Dtype of the frozen model's weights and activations; the soft prompt stays float32.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "revision",
        _MODEL.revision,
        "Hub branch, tag or commit of --model; unset for the default branch.",
        flag_values=fv,
    )


def _define_data_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list(
        "train_languages",
        None,
        "Comma-separated language codes of the training data, in schedule order. Unset: "
        f"{','.join(config_lib.MCD_LANGUAGES)} for --mode=mcd, "
        f"{','.join(config_lib.DRO_LANGUAGES)} for --mode=dro.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "anchor_languages",
        list(_DATA.anchor_languages),
        "Comma-separated language codes of the anchor set used to estimate the transform "
        "and the probes.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "dataset",
        _DATA.dataset,
        "Training and anchor data: 'builtin' (the parallel set shipped with mcd-jax), a "
        "benchmark registry name, or a path to a dataset folder or file.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "anchors_per_label",
        _DATA.anchors_per_label,
        "Estimate from only the first N harmful and the first N harmless anchor queries, in "
        "dataset order, to shorten estimation; unset uses them all.",
        flag_values=fv,
        **_bounds("anchors_per_label"),
    )


def _define_weight_flag(fv: flags.FlagValues, name: str, term: str) -> None:
    flags.DEFINE_float(
        name,
        getattr(_METHOD, name),
        f"Weight of the {term} in the objective (unitless, >= 0).",
        flag_values=fv,
        **_bounds(name),
    )


def _define_method_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "text_prompt",
        _METHOD.text_prompt,
        "Text safety prompt in the system slot for the text-prompt states: 'default' or "
        "'short' for the built-in Llama-2 prompts, 'paraphrase' for a paraphrase of the "
        "short one, or the prompt text itself.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "soft_prompt_init_text",
        _METHOD.soft_prompt_init_text,
        "Text whose token embeddings initialise the soft prompt, in the same form as "
        "--text_prompt. Unset: --text_prompt.",
        flag_values=fv,
    )

    flags.DEFINE_integer(
        "num_components",
        _METHOD.num_components,
        "PCA components that span the safety subspace (m).",
        flag_values=fv,
        **_bounds("num_components"),
    )
    flags.DEFINE_integer(
        "probe_folds",
        _METHOD.probe_folds,
        "Cross-validation folds per probe; the fold probes are averaged into one.",
        flag_values=fv,
        **_bounds("probe_folds"),
    )

    _define_weight_flag(fv, "weight_refusal", "refusal term L_r")
    _define_weight_flag(fv, "weight_harmfulness", "harmfulness term L_h")
    _define_weight_flag(fv, "weight_complement", "complement term L_U")
    _define_weight_flag(fv, "weight_consistency", "cross-language consistency term L_m")

    flags.DEFINE_enum(
        "consistency_target",
        _METHOD.consistency_target,
        _choices("consistency_target"),
        "Target of L_m: the mean text-prompt state of the other training languages "
        "(precomputed), or the mean of their soft-prompt states.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "mode",
        _METHOD.mode,
        _choices("mode"),
        "mcd: all four terms over several languages. dro: no L_m, English only.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "ablation",
        _METHOD.ablation,
        _choices("ablation"),
        "Objective term whose weight is set to 0, for ablation studies.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "placement",
        _METHOD.placement,
        _choices("placement"),
        "Where the soft prompt goes: the chat template's system slot, or a plain prefix "
        "before the chat-formatted query.",
        flag_values=fv,
    )


def _define_schedule_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "schedule",
        _SCHEDULE.schedule,
        _choices("schedule"),
        "collaborative: one language at a time, in --train_languages order. all_languages: "
        "every batch contains each query in every training language.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch_size",
        _SCHEDULE.batch_size,
        "Queries per batch (per language with --schedule=all_languages).",
        flag_values=fv,
        **_bounds("batch_size"),
    )
    flags.DEFINE_integer(
        "epochs_per_language",
        _SCHEDULE.epochs_per_language,
        "Epochs over each language's data (collaborative), or over all data (all_languages).",
        flag_values=fv,
        **_bounds("epochs_per_language"),
    )
    flags.DEFINE_float(
        "learning_rate",
        _SCHEDULE.learning_rate,
        "Learning rate (step size) of AdamW.",
        flag_values=fv,
        **_bounds("learning_rate"),
    )
    flags.DEFINE_float(
        "weight_decay",
        _SCHEDULE.weight_decay,
        "Decoupled weight decay of AdamW, per unit of learning rate.",
        flag_values=fv,
        **_bounds("weight_decay"),
    )
    flags.DEFINE_float(
        "grad_clip",
        _SCHEDULE.grad_clip,
        "Maximum global gradient norm; 0 disables clipping.",
        flag_values=fv,
        **_bounds("grad_clip"),
    )
    flags.DEFINE_integer(
        "seed",
        _SCHEDULE.seed,
        "Seed of the batch order and of every random draw.",
        flag_values=fv,
        **_bounds("seed"),
    )
    flags.DEFINE_integer(
        "grad_accum_steps",
        _SCHEDULE.grad_accum_steps,
        "Micro-batches whose gradients are summed into one optimizer step.",
        flag_values=fv,
        **_bounds("grad_accum_steps"),
    )
    flags.DEFINE_boolean(
        "remat",
        _SCHEDULE.remat,
        "Recompute the frozen model's activations in the backward pass to save memory.",
        flag_values=fv,
    )


def _define_estimation_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "estimation_artifacts",
        _ESTIMATION.artifacts,
        "Folder with transform.npz, refusal_probe.npz and harmfulness_probe.npz to train with "
        "instead of running estimation. Unset: run estimation in --workdir, or reuse its "
        "artifacts there.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "label_samples",
        _ESTIMATION.label_samples,
        "Responses generated per anchor query and prompt condition for the refusal labels.",
        flag_values=fv,
        **_bounds("label_samples"),
    )
    flags.DEFINE_integer(
        "label_keep_longest",
        _ESTIMATION.label_keep_longest,
        "Longest responses per anchor query and condition that the refusal label is computed from.",
        flag_values=fv,
        **_bounds("label_keep_longest"),
    )
    flags.DEFINE_integer(
        "label_max_new_tokens",
        _ESTIMATION.label_max_new_tokens,
        "Maximum new tokens per response when generating the refusal labels.",
        flag_values=fv,
        **_bounds("label_max_new_tokens"),
    )
    flags.DEFINE_enum(
        "label_decoding",
        _ESTIMATION.label_decoding,
        _choices("label_decoding"),
        "sampled: temperature 1.0, top-p 0.9, top-k 50. greedy: one deterministic response.",
        flag_values=fv,
    )


def _define_mesh_flags(fv: flags.FlagValues) -> None:
    for axis, purpose in (
        ("data", "data-parallel axis (batch sharding)"),
        ("fsdp", "axis over which the frozen weights are sharded"),
        ("tensor", "tensor-parallel axis"),
    ):
        flags.DEFINE_integer(
            f"mesh_{axis}",
            getattr(_MESH, axis),
            f"Devices along the {purpose}; 0 chooses automatically.",
            flag_values=fv,
            **_bounds(f"mesh_{axis}"),
        )


def _define_distributed_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "coordinator_address",
        _DISTRIBUTED.coordinator_address,
        "host:port of process 0 for jax.distributed.initialize; unset lets JAX detect it "
        "(Cloud TPU, SLURM).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes",
        _DISTRIBUTED.num_processes,
        "Number of JAX processes in the job; unset lets JAX detect it.",
        flag_values=fv,
        **_bounds("num_processes"),
    )
    flags.DEFINE_integer(
        "process_id",
        _DISTRIBUTED.process_id,
        "Index of this process, from 0; unset lets JAX detect it.",
        flag_values=fv,
        **_bounds("process_id"),
    )


def _define_checkpoint_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir",
        None,
        "Work directory of the run (config, estimation artifacts, checkpoints, metrics). "
        "Unset: checkpoints/<--run_name>.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "run_name",
        None,
        "Name of the run, used for the default --workdir. Unset: <model>-<mode>-<schedule>.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "save_every",
        _CHECKPOINT.save_every,
        "Steps between checkpoints; the last step and a preempted step are saved as well.",
        flag_values=fv,
        **_bounds("save_every"),
    )
    flags.DEFINE_integer(
        "keep_checkpoints",
        _CHECKPOINT.keep_checkpoints,
        "Number of most recent checkpoints kept; older ones are deleted.",
        flag_values=fv,
        **_bounds("keep_checkpoints"),
    )
    flags.DEFINE_boolean(
        "resume",
        _CHECKPOINT.resume,
        "Continue from the latest checkpoint in --workdir. --noresume fails if --workdir "
        "already has checkpoints.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "force_resume",
        _CHECKPOINT.force_resume,
        "Resume even if --workdir was made with another model, data, objective, schedule or "
        "soft prompt shape.",
        flag_values=fv,
    )


def _define_logging_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer(
        "log_every",
        _LOGGING.log_every,
        "Steps between one-line training summaries in the log.",
        flag_values=fv,
        **_bounds("log_every"),
    )
    flags.DEFINE_boolean(
        "tensorboard",
        _LOGGING.tensorboard,
        "Write TensorBoard event files to <--workdir>/tensorboard.",
        flag_values=fv,
    )


def _canonical_languages(codes: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Map codes to their canonical form; an invalid code is kept for its own validator."""
    if codes is None:
        return None
    canonical = []
    for code in codes:
        try:
            canonical.append(canonical_language(code))
        except ValueError:
            canonical.append(code)
    return tuple(canonical)


def _check_language_codes(codes: list[str] | None) -> bool:
    for code in codes or ():
        try:
            canonical_language(code)
        except ValueError as err:
            raise flags.ValidationError(str(err)) from err
    return True


def _train_languages(values: Mapping[str, Any]) -> tuple[str, ...]:
    languages = _canonical_languages(values["train_languages"])
    if languages is not None:
        return languages
    return config_lib.DRO_LANGUAGES if values["mode"] == "dro" else config_lib.MCD_LANGUAGES


def _section_values(values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Map a section's fields to flag values; validators pass only the flags they read."""
    fields = {}
    for flag_name, (flag_section, field) in FLAG_FIELDS.items():
        if flag_section == section and flag_name in values:
            value = values[flag_name]
            fields[field] = tuple(value) if isinstance(value, list) else value
    return fields


def _data_config(values: Mapping[str, Any]) -> config_lib.DataConfig:
    fields = _section_values(values, "data")
    fields["anchor_languages"] = _canonical_languages(fields["anchor_languages"])
    return config_lib.DataConfig(train_languages=_train_languages(values), **fields)


def _raise_problems(problems: list[str]) -> bool:
    if problems:
        raise flags.ValidationError("\n  ".join(problems))
    return True


def _check_languages_and_mode(values: Mapping[str, Any]) -> bool:
    data = config_lib.DataConfig(
        train_languages=_train_languages(values),
        anchor_languages=_canonical_languages(values["anchor_languages"]) or (),
    )
    method = config_lib.MethodConfig(mode=values["mode"], ablation=values["ablation"])
    return _raise_problems(config_lib.data_and_method_problems(data, method))


def _check_estimation(values: Mapping[str, Any]) -> bool:
    estimation = config_lib.EstimationConfig(**_section_values(values, "estimation"))
    return _raise_problems(config_lib.estimation_problems(estimation))


def _check_distributed(values: Mapping[str, Any]) -> bool:
    distributed = config_lib.DistributedConfig(**_section_values(values, "distributed"))
    return _raise_problems(config_lib.distributed_problems(distributed))


# Validators over several flags, each with the flags it reads; absl prints those flags' values
# before the message.
_COMBINATION_VALIDATORS = (
    (("train_languages", "anchor_languages", "mode", "ablation"), _check_languages_and_mode),
    (
        ("label_samples", "label_keep_longest", "label_max_new_tokens", "label_decoding"),
        _check_estimation,
    ),
    (("coordinator_address", "num_processes", "process_id"), _check_distributed),
)


def define_flags(flag_values: flags.FlagValues) -> None:
    """Define every training flag and its validators on `flag_values`.

    Importing this module calls it on `absl.flags.FLAGS`; tests call it on a fresh
    `flags.FlagValues()`.

    Args:
        flag_values: the registry to define the flags on.
    """
    _define_model_flags(flag_values)
    _define_data_flags(flag_values)
    _define_method_flags(flag_values)
    _define_schedule_flags(flag_values)
    _define_estimation_flags(flag_values)
    _define_mesh_flags(flag_values)
    _define_distributed_flags(flag_values)
    _define_checkpoint_flags(flag_values)
    _define_logging_flags(flag_values)

    for name in ("train_languages", "anchor_languages"):
        flags.register_validator(name, _check_language_codes, flag_values=flag_values)
    for names, checker in _COMBINATION_VALIDATORS:
        flags.register_multi_flags_validator(list(names), checker, flag_values=flag_values)


def mark_required_train_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Make parsing fail when a flag that training needs (--model) is missing.

    Call it in the launch script before `app.run`, not at import, so that other programs that
    import these flags need not pass --model.
    """
    flags.mark_flag_as_required("model", flag_values=flag_values)


def config_from_flags(
    flag_values: flags.FlagValues = FLAGS, *, check_workdir: bool = True
) -> config_lib.TrainConfig:
    """Build the run's `TrainConfig` from parsed flags.

    The defaults of --train_languages and --workdir depend on other flags and are resolved here.

    Args:
        flag_values: parsed flags.
        check_workdir: create the work directory and check that it is writable.

    Returns:
        The resolved configuration, with an absolute work directory.

    Raises:
        app.UsageError: --model is missing, the flags are inconsistent, or the work directory
            is not writable. `app.run` prints the message and exits with status 1.
    """
    values = flag_values.flag_values_dict()
    if not values["model"]:
        raise app.UsageError(
            "--model is required: a Hugging Face hub id, a local model folder or a packaged "
            "model name"
        )

    workdir = values["workdir"]
    if not workdir:
        run_name = values["run_name"] or config_lib.default_run_name(
            values["model"], values["mode"], values["schedule"]
        )
        workdir = f"checkpoints/{run_name}"
    try:
        config = config_lib.TrainConfig(
            model=config_lib.ModelSource(**_section_values(values, "model")),
            data=_data_config(values),
            method=config_lib.MethodConfig(**_section_values(values, "method")),
            schedule=config_lib.ScheduleConfig(**_section_values(values, "schedule")),
            estimation=config_lib.EstimationConfig(**_section_values(values, "estimation")),
            mesh=config_lib.MeshConfig(**_section_values(values, "mesh")),
            distributed=config_lib.DistributedConfig(**_section_values(values, "distributed")),
            checkpoint=config_lib.CheckpointConfig(
                workdir=str(Path(workdir).expanduser().absolute()),
                **_section_values(values, "checkpoint"),
            ),
            logging=config_lib.LoggingConfig(**_section_values(values, "logging")),
        )
        if check_workdir:
            config_lib.ensure_writable_workdir(config.checkpoint.workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    return config


define_flags(FLAGS)
