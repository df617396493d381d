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


def enable_compilation_cache(directory: str | None) -> str | None:
    """Keep compiled programs in ``directory`` (local or gs://) and reuse them in later runs of
    the same program: restarts and requeues of a large model skip minutes of compiling. Unset,
    JAX's own ``JAX_COMPILATION_CACHE_DIR`` (which the launchers set) applies; returns the
    directory in use, or None when there is no cache."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
    return jax.config.jax_compilation_cache_dir or None


def start(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """INFO logging for this package, the persistent compilation cache
    (``config.compilation_cache_dir``), then ``jax.distributed`` before anything touches devices
    (the runtime decides which devices this process sees); only process 0 logs progress."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = flag_values["config"].value if "config" in flag_values else None
    cache = enable_compilation_cache(config.get("compilation_cache_dir") if config else None)
    logging.info("compilation cache: %s", cache or "off")
    distributed.initialize(distributed.options_from_flags(flag_values))
    if jax.process_index() != 0:  # one host's progress lines are enough; problems still show
        logging.set_verbosity(logging.WARNING)
