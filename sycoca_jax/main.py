r"""Train SyCoCa (or CoCa / CLIP) from a config.

  python -m sycoca_jax.main --config=configs/sycoca.py:tiny --workdir=/tmp/sycoca_tiny
  python -m sycoca_jax.main --config=configs/sycoca.py:size=B/16 --config.batch_size=4096 ...

Runs resume from ``--workdir`` automatically; SIGTERM saves a checkpoint and exits.
"""

from __future__ import annotations

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from sycoca_jax import train


class _QuietLibraries(std_logging.Filter):
    """INFO lines from this package only; libraries (orbax logs every file it writes) speak up
    at WARNING and above."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "sycoca_jax" in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (local or gs://).")
    flags.mark_flags_as_required(["config", "workdir"])


def run() -> None:
    """Console-script entry point (``sycoca-train``)."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
