"""Train a soft safety prompt: parse the flags and run the training job.

Example, the CPU demo (see configs/demo_cpu.cfg):

    python launch/train.py --flagfile=configs/demo_cpu.cfg --workdir=checkpoints/demo

Every flag is defined in `mcd_jax/flags.py`; `--helpfull` lists them.
"""

import sys

from absl import app, logging

from mcd_jax import flags as mcd_flags
from mcd_jax.method.estimation import DegenerateLabelsError
from mcd_jax.training.checkpointing import FingerprintMismatchError
from mcd_jax.training.job import JobConfigurationError, run_training_job


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments {argv[1:]}; pass flags only")
    config = mcd_flags.config_from_flags()
    try:
        run_training_job(config)
    except JobConfigurationError as err:
        raise app.UsageError(str(err)) from err
    except FingerprintMismatchError as err:
        logging.error("Training failed: %s", err)
        sys.exit(1)
    except DegenerateLabelsError as err:
        # Not a usage error: the flags were valid, but the model's responses cannot label anchors.
        logging.error("Estimation failed: %s", err)
        sys.exit(1)


if __name__ == "__main__":
    mcd_flags.mark_required_train_flags()
    app.run(main)
