"""What every absl binary (train, evaluate, transfer) shares: its two required flags, logging,
the multi-host runtime and the console-script entry."""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sycoca_jax import distributed


class _QuietLibraries(std_logging.Filter):
    """INFO lines from this package only; libraries (orbax logs every file it writes) speak up
    at WARNING and above."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "sycoca_jax" in record.pathname


def define_flags(config_help: str, workdir_help: str) -> None:
    """The flags every binary has: ``--config`` (a locked config file) and ``--workdir``, both
    required, and the multi-host runtime's. Binaries call this from their own ``define_flags``,
    never at import, so importing a binary has no side effects."""
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
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


def run(main: Callable[[flags.FlagValues], None], define: Callable[[], None]) -> None:
    """A binary's entry (``python -m`` and its console script): define its flags, parse them,
    reject stray positional arguments, ``start``, then ``main(flags.FLAGS)``."""
    before = set(flags.FLAGS)
    define()
    _help_like_python_m(main.__module__, set(flags.FLAGS) - before)

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        start()
        main(flags.FLAGS)

    app.run(_main)


def _help_like_python_m(module: str, names: set[str]) -> None:
    """``--help`` lists the flags and docstring of the running program's ``__main__``; a console
    script's ``__main__`` is a generated wrapper, so lend it the binary's (no-op under -m)."""
    for name in sorted(names):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    entry = sys.modules["__main__"]
    if not entry.__doc__:
        entry.__doc__ = sys.modules[module].__doc__
