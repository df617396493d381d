"""What every absl binary (train, evaluate, transfer, tools) shares: its two required flags,
logging, the multi-host runtime, the config from flags, the console-script entry, and one-line
errors.

``run`` (and ``run_tool`` / ``run_app`` for the tools) wrap ``app.run``: an error the user caused
or can act on (a ``sycoca_jax.errors.UserError``: a bad config value, an unknown ``--config.x.y``
key, a missing checkpoint, a busy workdir, a damaged checkpoint) prints one line on stderr and
exits with 2 (a bad flag or config value) or 1; any other exception keeps its traceback, since it
is a bug.
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

from sycoca_jax import config_checks, config_keys
from sycoca_jax.errors import UserError


class _QuietLibraries(std_logging.Filter):
    """INFO lines from this package only; libraries (orbax logs every file it writes) speak up
    at WARNING and above."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "sycoca_jax" in record.pathname


def define_flags(config_help: str, workdir_help: str) -> None:
    """The flags every binary has: ``--config`` (a locked config file) and ``--workdir``, both
    required, and the multi-host runtime's. Binaries call this from their own ``define_flags``,
    never at import, so importing a binary has no side effects."""
    from ml_collections import config_flags

    from sycoca_jax import distributed

    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])
    distributed.define_flags()


def define_force_unlock() -> None:
    """``--force_unlock`` for binaries that write a workdir (training, transfer)."""
    flags.DEFINE_bool(
        "force_unlock",
        False,
        "Take the workdir's lease even from a run that looks alive (only for a run you know is "
        "dead; a lease not refreshed for 5 minutes is taken over without it).",
    )


def enable_compilation_cache(directory: str | None) -> str | None:
    """Keep compiled programs in ``directory`` (local or gs://) and reuse them in later runs of
    the same program: restarts and requeues of a large model skip minutes of compiling. Unset,
    JAX's own ``JAX_COMPILATION_CACHE_DIR`` (which the launchers set) applies; returns the
    directory in use, or None when there is no cache."""
    import jax

    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
    return jax.config.jax_compilation_cache_dir or None


def start(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """INFO logging for this package, the persistent compilation cache
    (``config.compilation_cache_dir``), then ``jax.distributed`` before anything touches devices
    (the runtime decides which devices this process sees); only process 0 logs progress."""
    import jax

    from sycoca_jax import distributed

    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = flag_values["config"].value if "config" in flag_values else None
    cache = enable_compilation_cache(config.get("compilation_cache_dir") if config else None)
    logging.info("compilation cache: %s", cache or "off")
    distributed.initialize(distributed.options_from_flags(flag_values))
    if jax.process_index() != 0:  # one host's progress lines are enough; problems still show
        logging.set_verbosity(logging.WARNING)


# ------------------------------------------------------------------------------------ config
def config_from_flags(
    flag_values: flags.FlagValues = flags.FLAGS, name: str = "config", validate: bool = True
) -> Any:
    """The ``--<name>`` config as the command line meant it: a duration unit given there clears
    the preset's other units (``--config.total_steps=N`` on a config presetting
    ``total_epochs``), then every field is checked (``config_checks.validate``)."""
    from ml_collections import config_flags

    config = flag_values[name].value
    overrides = config_flags.get_override_values(flag_values[name])
    cleared = config_checks.apply_duration_overrides(config, overrides)
    if cleared:
        logging.info("cleared %s: the command line sets the duration", ", ".join(cleared))
    if validate:
        config_checks.validate(config)
    return config


# ------------------------------------------------------------------------------------ errors
def _program() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0])


def fail(message: str, exit_code: int = 1) -> NoReturn:
    """Print ``<program>: error: <message>`` on stderr and exit."""
    print(f"{_program()}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def guard(
    main: Callable[..., Any], expected: tuple[type[BaseException], ...] = ()
) -> Callable[..., Any]:
    """``main`` with ``UserError`` (and the ``expected`` types, e.g. ``FileNotFoundError`` for a
    command-line tool reading user paths) turned into one line and an exit code."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as error:
            fail(str(error), error.exit_code)
        except expected as error:
            fail(str(error), 1)

    guarded.__name__ = getattr(main, "__name__", "main")
    guarded.__doc__ = main.__doc__
    return guarded


def _configs_in(argv: Sequence[str]) -> dict[str, Any]:
    """The config files given as ``--<name>=path.py[:arg]`` that ``--<name>.x.y`` overrides
    refer to, loaded (ml_collections fails on a bad override before it stores the config)."""
    from sycoca_jax.config_args import load_config

    found = {}
    for arg in argv:
        name, sep, spec = arg[2:].partition("=")
        if not arg.startswith("--") or not sep or "." in name or name not in flags.FLAGS:
            continue
        if not any(other.startswith(f"--{name}.") for other in argv):
            continue
        value = getattr(flags.FLAGS[name], "value", None)
        if hasattr(value, "to_dict"):
            found[name] = value
        elif spec.partition(":")[0].endswith(".py"):
            try:
                found[name] = load_config(spec)
            except Exception:  # the config file itself is broken: absl's message says how
                continue
    return found


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (for ``app.run``) with errors in one line, exit code 2: an unknown
    ``--config.x.y`` override is named with the closest existing key (ml_collections reports it
    as ``AttributeError: "'x'"`` with a traceback, or as an unknown flag)."""
    try:
        return flags.FLAGS(list(argv))
    except (flags.Error, AttributeError, KeyError) as error:
        try:  # overrides may come from a --flagfile (the launch recipes)
            expanded = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
        except flags.Error:
            expanded = list(argv)
        for name, config in _configs_in(expanded).items():
            message = config_keys.unknown_override_message(config, expanded, name)
            if message:
                fail(message, 2)
        if not isinstance(error, flags.Error):
            raise
        message = str(error)
        head, traceback, tail = message.partition("Traceback (most recent call last):")
        if traceback:  # a config file that raised: its own last line says why
            message = head + tail.strip().splitlines()[-1]
        fail(f"{' '.join(message.split())} (--helpshort lists the flags)", 2)


def run_app(main: Callable[[list[str]], Any]) -> None:
    """``app.run(main)`` with one-line user errors (see the module docstring)."""
    app.run(guard(main), flags_parser=parse_flags)


def run_tool(
    main: Callable[[flags.FlagValues], Any],
    define: Callable[[], None],
    verbosity: int | None = logging.INFO,
) -> None:
    """A tool's entry (``python -m``): define its flags, parse them, reject stray positional
    arguments, log at ``verbosity`` (None: leave it), then ``main(flags.FLAGS)``; user errors in
    one line."""
    before = set(flags.FLAGS)
    define()
    _help_like_python_m(main.__module__, set(flags.FLAGS) - before)

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if verbosity is not None:
            logging.set_verbosity(verbosity)
        main(flags.FLAGS)

    run_app(_main)


def run(main: Callable[[flags.FlagValues], None], define: Callable[[], None]) -> None:
    """A binary's entry (``python -m`` and its console script): ``run_tool`` that first resolves
    and checks ``--config`` (``config_from_flags``: before any work), then ``start``s."""

    @functools.wraps(main)
    def _main(flag_values: flags.FlagValues) -> None:
        config_from_flags(flag_values)
        start(flag_values)
        main(flag_values)

    run_tool(_main, define, verbosity=None)


def _help_like_python_m(module: str, names: set[str]) -> None:
    """``--help`` lists the flags and docstring of the running program's ``__main__``; a console
    script's ``__main__`` is a generated wrapper, so lend it the binary's (no-op under -m)."""
    for name in sorted(names):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    entry = sys.modules["__main__"]
    if not entry.__doc__:
        entry.__doc__ = sys.modules[module].__doc__
