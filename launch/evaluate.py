r"""Compare refusal and false-refusal rates per language for several systems of one chat model.

Example, the demo model with no system prompt, the default text prompt and a trained
soft prompt on the built-in test split:

    python launch/evaluate.py --model=packaged:qwen2.5-coder-0.5b-instruct \
        --soft_prompts=MCD=runs/mcd --limit_per_language=20 --output_dir=runs/mcd/eval

The report folder receives report.json, report.md and report.png.
"""

from __future__ import annotations

from absl import app, flags

from mcd_jax.evaluation import (
    BUILTIN_SYSTEMS,
    DECODINGS,
    EvaluationConfig,
    parse_soft_prompts,
    run_evaluation,
)
from mcd_jax.evaluation.job import DTYPES

_MODEL = flags.DEFINE_string(
    "model", None, "Model: a folder, a hub id, a .gguf file or packaged:<name>.", required=True
)
_REVISION = flags.DEFINE_string(
    "revision", None, "Hub revision (branch, tag or commit) of --model."
)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(DTYPES), "Dtype of the frozen weights.")
_SOFT_PROMPTS = flags.DEFINE_list(
    "soft_prompts",
    [],
    "Soft prompts to evaluate as name=path pairs; a path is a .npy or .safetensors file, an "
    "export folder or a training work directory. Example: DRO=runs/dro,MCD=runs/mcd.",
)
_SYSTEMS = flags.DEFINE_multi_enum(
    "systems",
    list(BUILTIN_SYSTEMS),
    list(BUILTIN_SYSTEMS),
    "Systems without a soft prompt: none (empty system slot) and default (the default text "
    "prompt).",
)
_NO_BASELINES = flags.DEFINE_bool(
    "no_baselines", False, "Evaluate only the soft prompts, without the --systems baselines."
)
_DATASET = flags.DEFINE_list(
    "dataset",
    ["builtin"],
    "Datasets: builtin (our parallel test split), benchmark names (advbench, multijail, xstest, "
    "...) or files with text, language and label columns.",
)
_SPLIT = flags.DEFINE_string("split", "test", "Split of the built-in dataset and the benchmarks.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Local benchmark folder; defaults to $MCD_JAX_DATA_DIR."
)
_LANGUAGES = flags.DEFINE_list("languages", None, "Language codes to evaluate; default all.")
_LIMIT = flags.DEFINE_integer(
    "limit_per_language",
    None,
    "Evaluate the first N harmful and the first N harmless queries of each language.",
    lower_bound=1,
)
_TRAINED_LANGUAGES = flags.DEFINE_list(
    "trained_languages",
    None,
    "Training languages of the soft prompts, overriding their metadata; marks the other "
    "languages as never trained.",
)
_IGNORE_MODEL_SOURCE = flags.DEFINE_bool(
    "ignore_model_source",
    False,
    "Accept a soft prompt whose recorded weight-file sha256 or hub id differs from --model's "
    "(another copy or quantization of the same model). Architecture, hidden size and chat "
    "template are checked either way.",
)
_DECODING = flags.DEFINE_enum(
    "decoding",
    "greedy",
    list(DECODINGS),
    "greedy: one response per query. sampled: the reference protocol (25 samples, temperature "
    "1.0, top-p 0.9, top-k 50, 10 to 300 (harmful) or 200 (harmless) new tokens, 20 longest kept).",
)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 64, "Maximum new tokens per response in greedy decoding.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of sampled decoding.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    16,
    "Rows per generation batch; a multiple of mesh_data x mesh_fsdp.",
    lower_bound=1,
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the report files.", required=True)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a report of different settings in --output_dir."
)
_MESH_DATA = flags.DEFINE_integer(
    "mesh_data", 1, "Devices on the data-parallel axis.", lower_bound=1
)
_MESH_FSDP = flags.DEFINE_integer(
    "mesh_fsdp", 1, "Devices over which the frozen weights are sharded.", lower_bound=1
)
_MESH_TENSOR = flags.DEFINE_integer(
    "mesh_tensor", 1, "Devices on the tensor-parallel axis.", lower_bound=1
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    config = EvaluationConfig(
        model=_MODEL.value,
        output_dir=_OUTPUT_DIR.value,
        systems=() if _NO_BASELINES.value else tuple(dict.fromkeys(_SYSTEMS.value)),
        soft_prompts=parse_soft_prompts(_SOFT_PROMPTS.value),
        datasets=tuple(_DATASET.value),
        split=_SPLIT.value,
        languages=None if _LANGUAGES.value is None else tuple(_LANGUAGES.value),
        limit_per_language=_LIMIT.value,
        data_dir=_DATA_DIR.value,
        trained_languages=(
            None if _TRAINED_LANGUAGES.value is None else tuple(_TRAINED_LANGUAGES.value)
        ),
        check_model_source=not _IGNORE_MODEL_SOURCE.value,
        decoding=_DECODING.value,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        seed=_SEED.value,
        batch_size=_BATCH_SIZE.value,
        dtype=_DTYPE.value,
        revision=_REVISION.value,
        mesh=(_MESH_DATA.value, _MESH_FSDP.value, _MESH_TENSOR.value),
        overwrite=_OVERWRITE.value,
    )
    run_evaluation(config)


if __name__ == "__main__":
    app.run(main)
