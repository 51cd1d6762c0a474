"""A minimal training launcher: parse the flags, write the resolved config, print its path.

The flag tests run it as a subprocess to see the real command-line behaviour of absl.
"""

from absl import app

from mcd_jax import flags as mcd_flags
from mcd_jax.training.config import write_resolved_config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = mcd_flags.config_from_flags()
    print(write_resolved_config(config, config.checkpoint.workdir))


if __name__ == "__main__":
    mcd_flags.mark_required_train_flags()
    app.run(main)
