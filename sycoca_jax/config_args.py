"""Parsing of config-file arguments: ``configs/sycoca.py:size=B/16,objective=coca``.

Config files call ``parse_arg(arg, size="tiny", objective="sycoca", ...)``; the defaults fix the
allowed keys and their types, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", ""):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"config argument {key}={text!r}: expected a boolean")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_arg(
    arg: str | None, *, positional: str | None = None, **defaults: Any
) -> ml_collections.ConfigDict:
    """Parse ``"k1=v1,k2=v2,flag"`` against ``defaults``.

    A bare word sets a boolean default to True, or else sets the ``positional`` key (so
    ``sycoca.py:tiny`` means ``size=tiny``). Unknown keys raise ``ValueError`` naming the known
    ones.
    """
    values = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            if isinstance(defaults.get(key), bool):
                values[key] = True
                continue
            if positional is None:
                raise ValueError(f"config argument {item!r} has no '=' and no positional key")
            key, text = positional, item
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}"
            )
        values[key] = _convert(key, text.strip(), defaults[key])
    return ml_collections.ConfigDict(values)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``"path/to/config.py[:arg]"`` the way ``--config=`` does, for notebooks and tests."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_sycoca_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
