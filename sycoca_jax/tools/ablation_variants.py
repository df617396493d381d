"""The ablation's variants (SyCoCa Table 5's rows and more) and their command-line spelling:
``NAME:OBJECTIVE,key=value,...`` config overrides (``sycoca_jax.tools.ablate``)."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

# name -> (objective, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "clip": ("clip", {}),
    "coca": ("coca", {}),
    "coca_attentive_caption": ("coca", {"model.caption_masking": "attentive"}),
    "sycoca_random_tgmim": ("sycoca", {"model.tgmim_masking": "random"}),
    "sycoca": ("sycoca", {}),
    "coca_random_caption": ("coca", {"model.caption_masking": "random"}),
}
TABLE5 = ("clip", "coca", "coca_attentive_caption", "sycoca_random_tgmim", "sycoca")


def parse_value(text: str) -> Any:
    """``0.25`` -> float, ``True`` -> bool, ``(1, 2)`` -> tuple, anything else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(definition: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """``"NAME:OBJECTIVE,key=value,..."`` -> (name, (objective, overrides))."""
    name, sep, rest = definition.partition(":")
    if not sep or not name or not rest:
        raise ValueError(
            f"--variant={definition!r}: expected NAME:OBJECTIVE[,key=value...], e.g. "
            "keep25:sycoca,model.caption_keep_ratio=0.25"
        )
    objective, *items = rest.split(",")
    overrides = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--variant={definition!r}: {item!r} is not key=value")
        overrides[key.strip()] = parse_value(value.strip())
    return name, (objective, overrides)


def set_override(config: Any, key: str, value: Any) -> None:
    """``config.a.b = value`` for ``key="a.b"``; an unknown key fails naming it."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise KeyError(f"override {key}={value!r}: config has no {part!r}")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"override {key}={value!r}: config has no field {leaf!r} there")
    node[leaf] = value


def select_variants(names: Sequence[str], definitions: Sequence[str]) -> dict[str, Any]:
    known = dict(VARIANTS)
    for definition in definitions:
        name, value = parse_variant(definition)
        known[name] = value
    chosen = list(names) or list(TABLE5)
    chosen += [parse_variant(d)[0] for d in definitions if parse_variant(d)[0] not in chosen]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(
            f"unknown variants {unknown}; known: {sorted(known)} (define one with "
            "--variant=NAME:OBJECTIVE,key=value)"
        )
    return {n: known[n] for n in chosen}
