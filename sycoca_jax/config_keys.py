"""Config keys: dotted access to a nested config, and unknown ``--config.x.y`` keys named with
the closest existing one (a misspelt override otherwise ends in ``AttributeError: "'lr_rate'"``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

# Common names of fields this project spells differently (optax's, PyTorch's), for typo hints.
SYNONYMS = {
    "learning_rate": "lr",
    "beta1": "b1",
    "beta2": "b2",
    "epsilon": "eps",
    "wd": "weight_decay",
    "clip_grad_norm": "grad_clip",
    "max_grad_norm": "grad_clip",
    "steps": "total_steps",
    "epochs": "total_epochs",
    "global_batch_size": "batch_size",
}


# ------------------------------------------------------------------------------ field access
def get_field(config: Any, dotted: str) -> Any:
    """The value at ``dotted`` (None where a part is missing)."""
    for key in dotted.split("."):
        config = config.get(key) if hasattr(config, "get") else None
    return config


def has_field(config: Any, dotted: str) -> bool:
    """Whether ``dotted`` names a field of ``config``."""
    node = config
    for key in dotted.split("."):
        if not hasattr(node, "keys") or key not in node.keys():
            return False
        node = node[key]
    return True


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """Every leaf of a (nested) config as a dotted key."""
    keys = []
    for key in config.keys():
        value = config[key]
        name = f"{prefix}{key}"
        keys.extend(flat_keys(value, f"{name}.") if hasattr(value, "keys") else [name])
    return keys


# --------------------------------------------------------------------------- unknown keys
def unknown_key_message(config: Any, dotted: str, flag: str = "config") -> str | None:
    """One line naming the closest existing key when ``dotted`` is not a field of ``config``
    (None when it is)."""
    if has_field(config, dotted):
        return None
    keys = flat_keys(config)
    parts = dotted.split(".")
    # The deepest existing parent: its own children are the likeliest meant.
    depth = 0
    while depth < len(parts) - 1 and has_field(config, ".".join(parts[: depth + 1])):
        depth += 1
    parent = ".".join(parts[:depth])
    siblings = [k for k in keys if not parent or k.startswith(parent + ".")]
    pool = siblings or keys
    closest = difflib.get_close_matches(dotted, pool, n=1, cutoff=0.0)
    by_leaf = difflib.get_close_matches(
        parts[-1], [k.rsplit(".", 1)[-1] for k in pool], n=1, cutoff=0.6
    )
    if by_leaf:  # a near-miss of the last name beats the whole-string match
        closest = [next(k for k in pool if k.rsplit(".", 1)[-1] == by_leaf[0])]
    synonym = ".".join([*parts[:depth], SYNONYMS.get(parts[-1], "")])
    if parts[-1] in SYNONYMS and synonym in pool:
        closest, by_leaf = [synonym], [synonym]
    message = f"--{flag}.{dotted}: the config has no field {dotted!r}"
    if closest:
        message += f"; did you mean --{flag}.{closest[0]}?"
    if not by_leaf:  # no confident guess: list what is there
        names = sorted(
            {k[len(parent) + 1 :].split(".")[0] if parent else k.split(".")[0] for k in pool}
        )
        message += f" ({parent or 'the top level'} has: {', '.join(names)})"
    return message


def unknown_override_message(config: Any, argv: Sequence[str], flag: str = "config") -> str | None:
    """The first ``--<flag>.x.y`` argument naming no field of ``config``, as one line."""
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        dotted = arg[len(flag) + 3 :].split("=", 1)[0]
        message = unknown_key_message(config, dotted, flag)
        if message:
            return message
    return None
