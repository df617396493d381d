"""Errors the user caused or can act on (a flag value, a path, a busy workdir, a damaged
checkpoint). Binaries print them as one line and exit with ``exit_code``; every other exception
keeps its traceback, since it is a bug to report."""

from __future__ import annotations


class UserError(Exception):
    """An expected error whose message says what is wrong and how to proceed."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config value is missing, out of range or inconsistent with another one."""

    exit_code = 2
