"""Durations given in steps, epochs or examples, turned into steps.

A config names a duration once, as ``<name>_steps``, ``<name>_epochs`` or ``<name>_examples``
(e.g. ``total_steps`` or ``total_epochs``); exactly one may be set.
"""

from __future__ import annotations

import math
from typing import Any


def to_steps(
    config: Any, name: str, batch_size: int, num_examples: int | None, default: int | None = None
) -> int:
    """Resolve ``config.<name>_{steps,epochs,examples}`` to a step count."""
    given = {
        unit: config.get(f"{name}_{unit}")
        for unit in ("steps", "epochs", "examples")
        if config.get(f"{name}_{unit}") is not None
    }
    if len(given) > 1:
        raise ValueError(f"set only one of {', '.join(f'{name}_{u}' for u in given)}")
    if not given:
        if default is None:
            raise ValueError(f"set one of {name}_steps, {name}_epochs or {name}_examples")
        return default
    unit, value = next(iter(given.items()))
    if unit == "steps":
        return int(value)
    if unit == "examples":
        return int(math.ceil(value / batch_size))
    if num_examples is None:
        raise ValueError(f"{name}_epochs needs the dataset size, which is unknown here")
    return int(math.ceil(value * num_examples / batch_size))


def run_length(config: Any, num_examples: int | None) -> tuple[int, int]:
    """(total steps, warmup steps) of a training config (``total_*`` and ``optim.warmup_*``)."""
    total = to_steps(config, "total", config.batch_size, num_examples)
    warmup = to_steps(config.optim, "warmup", config.batch_size, num_examples, 0)
    if total <= 0:
        raise ValueError(f"the run has {total} steps; set a positive total_steps/epochs/examples")
    return total, warmup
