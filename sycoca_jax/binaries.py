"""What every absl binary (train, evaluate, transfer) does first: logging and the runtime."""

from __future__ import annotations

import logging as std_logging

import jax
from absl import flags, logging

from sycoca_jax import distributed


class _QuietLibraries(std_logging.Filter):
    """INFO lines from this package only; libraries (orbax logs every file it writes) speak up
    at WARNING and above."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "sycoca_jax" in record.pathname


def define_flags() -> None:
    """The flags every binary shares (the multi-host runtime's)."""
    distributed.define_flags()


def start(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """INFO logging for this package, then ``jax.distributed`` before anything touches devices
    (the runtime decides which devices this process sees); only process 0 logs progress."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    distributed.initialize(distributed.options_from_flags(flag_values))
    if jax.process_index() != 0:  # one host's progress lines are enough; problems still show
        logging.set_verbosity(logging.WARNING)
