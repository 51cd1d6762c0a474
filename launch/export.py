"""Export the soft prompt of a training run for PyTorch, PEFT and NumPy users.

Reads the run's final soft prompt (or its newest checkpoint when the run did not finish), its
resolved config.json and its model record, checks the soft prompt against the target model,
and writes an export folder (see `mcd_jax.export`).

Example:
  python launch/export.py --workdir=runs/smollm2-mcd --output=runs/smollm2-mcd/export
"""

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Work directory of the training run.", required=True)
flags.DEFINE_string(
    "output", None, "Export folder to write; defaults to <workdir>/export. Created if missing."
)
flags.DEFINE_list(
    "formats",
    None,
    "Comma-separated export formats from safetensors, npy, peft. Default: safetensors,npy, "
    "plus peft for a soft prompt trained with --placement=prefix.",
)
flags.DEFINE_bool(
    "overwrite", False, "Replace a different export already in --output instead of failing."
)
flags.DEFINE_string(
    "model",
    None,
    "Target model: a folder, .gguf file, hub id or packaged:<name>. Defaults to the run's "
    "--model. Only its config and tokenizer are read; the soft prompt must match its "
    "architecture, hidden size and chat template.",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass options as --flags.")
    from mcd_jax.export import ExportError, export_workdir

    try:
        result = export_workdir(
            FLAGS.workdir,
            FLAGS.output,
            formats=FLAGS.formats,
            overwrite=FLAGS.overwrite,
            model_ref=FLAGS.model,
        )
    except (ExportError, FileNotFoundError) as error:
        logging.error("Export of %s failed: %s", FLAGS.workdir, error)
        sys.exit(1)
    state = "unchanged" if result.unchanged else "written"
    logging.info("Export %s: %s", state, ", ".join(str(path) for path in result.files.values()))


if __name__ == "__main__":
    app.run(main)
