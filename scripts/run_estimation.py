"""Run the estimation stage alone and print its summary.

Writes the transform, both probes, the anchor states, the refusal labels, the raw responses
and `summary.json` to `<workdir>/estimation/`, as the training job does before it trains.
A second run with the same model, anchors, judge and settings reuses those files.

Example, the demo model on the built-in English anchors with greedy labels:

    HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu .venv/bin/python scripts/run_estimation.py \\
        --model=packaged:qwen2.5-coder-0.5b-instruct --dtype=float32 \\
        --workdir=/tmp/estimation-qwen --label_decoding=greedy --label_samples=1 \\
        --label_keep_longest=1 --label_max_new_tokens=48
"""

from __future__ import annotations

import json

import jax.numpy as jnp
from absl import app, flags, logging

from mcd_jax.method.estimation import EstimationSettings, run_estimation
from mcd_jax.method.probes import ProbeTrainingConfig
from mcd_jax.models import load_model
from mcd_jax.training.config import EstimationConfig

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}

_MODEL = flags.DEFINE_string(
    "model", None, "Model: a folder, a .gguf file, a hub id or packaged:<name>.", required=True
)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(_DTYPES), "Dtype of the frozen weights.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Work directory; artifacts go to <workdir>/estimation/.", required=True
)
_DATASET = flags.DEFINE_string(
    "dataset", "builtin", "Anchor data: builtin, a benchmark name or a data file."
)
_SPLIT = flags.DEFINE_string("split", "train", "Dataset split of the anchor set.")
_LANGUAGES = flags.DEFINE_list("anchor_languages", ["en"], "Language codes of the anchor set.")
_PER_LABEL = flags.DEFINE_integer(
    "anchors_per_label",
    None,
    "Keep only the first N harmful and N harmless anchors.",
    lower_bound=1,
)
_SAMPLES = flags.DEFINE_integer("label_samples", 25, "Responses per query and condition.")
_KEEP = flags.DEFINE_integer("label_keep_longest", 20, "Longest responses judged per query.")
_MAX_NEW = flags.DEFINE_integer("label_max_new_tokens", 200, "Maximum new tokens per response.")
_DECODING = flags.DEFINE_enum(
    "label_decoding", "sampled", ["sampled", "greedy"], "Decoding of the label responses."
)
_COMPONENTS = flags.DEFINE_integer("num_components", 4, "PCA components m.", lower_bound=1)
_FOLDS = flags.DEFINE_integer("probe_folds", 10, "Cross-validation folds per probe.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per compiled batch.", lower_bound=1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments {argv[1:]}; pass flags only")
    settings = EstimationSettings(
        dataset=_DATASET.value,
        split=_SPLIT.value,
        languages=tuple(_LANGUAGES.value),
        anchors_per_label=_PER_LABEL.value,
        num_components=_COMPONENTS.value,
        labels=EstimationConfig(
            label_samples=_SAMPLES.value,
            label_keep_longest=_KEEP.value,
            label_max_new_tokens=_MAX_NEW.value,
            label_decoding=_DECODING.value,
        ),
        probe=ProbeTrainingConfig(num_folds=_FOLDS.value),
        batch_size=_BATCH.value,
    )
    loaded = load_model(_MODEL.value, dtype=_DTYPES[_DTYPE.value])
    result = run_estimation(loaded, settings, _WORKDIR.value)
    logging.info("Artifacts in %s (reused: %s)", result.directory, result.reused)
    print(json.dumps(result.summary, indent=2))


if __name__ == "__main__":
    app.run(main)
