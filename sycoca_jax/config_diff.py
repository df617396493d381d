"""What changed between a checkpoint's config and the config resuming it.

A resumed run must be the same run. Every field is treated as defining the run (data source,
split and shuffle seed, batch size, model, objective, loss weights, seed, optimiser and schedule,
input preprocessing, and the input workers, whose layout the saved iterator state depends on)
unless ``SAFE_FIELDS`` names it: run length, cadences, evaluations, where the data lives, the
mesh, and implementation choices that compute the same function. A change to a defining field is
an error unless ``--config.allow_config_change=field,...`` accepts it; safe changes are returned
for logging. The diff is returned so it can be written to ``metrics.jsonl`` and the checkpoint
(``Checkpointer.note``).

Keys present on one side only (the code added or removed a field since the checkpoint) are
reported as schema changes, logged, not refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sycoca_jax.errors import ConfigError

ALLOW_KEY = "allow_config_change"

# Dotted keys, or prefixes of them (a whole subtree), that may change on resume.
SAFE_FIELDS = (
    # How long, how often: the run stays the same run. (A longer run stretches the learning-rate
    # schedule from the resumed step on; that is what extending a run means.)
    "total_steps",
    "total_epochs",
    "total_examples",
    "log_every_steps",
    "eval_every_steps",
    "eval_batches",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "evals",
    # Read only when the workdir holds no checkpoint.
    "resume",
    "init",
    "init_step",  # transfer: the pretrained tower, read only when the workdir holds no checkpoint
    "eval_batch_size",
    # Placement and plumbing: the state is restored into the new shardings; the data stream is
    # the same records in the same order.
    "mesh",
    "data.data_dir",
    "data.eval_split",
    "data.prefetch_buffer_size",
    "data.max_skipped_fraction",
    "data.device_prefetch",
    "compilation_cache_dir",
    # Observation only.
    "profile_steps",
    "tensorboard_pictures",
    # Kernels and memory choices that compute the same function.
    "model.attention_impl",
    "model.remat",
    "model.scan_unroll",
)

_ABSENT = "<absent>"


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {_show(self.old)} → {_show(self.new)}"


@dataclasses.dataclass(frozen=True)
class ConfigDiff:
    """Changes found on resume: ``safe`` (allowed by nature), ``accepted`` (defining fields the
    user accepted), ``schema`` (fields only one side has)."""

    safe: tuple[Change, ...] = ()
    accepted: tuple[Change, ...] = ()
    schema: tuple[Change, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.safe or self.accepted or self.schema)

    def record(self) -> dict[str, Any]:
        """A JSON object for ``metrics.jsonl`` and the checkpoint:
        ``{"config_change": {kind: {field: [old, new]}}}``."""
        kinds = {"safe": self.safe, "accepted": self.accepted, "schema": self.schema}
        return {
            "config_change": {
                kind: {c.field: [c.old, c.new] for c in changes}
                for kind, changes in kinds.items()
                if changes
            }
        }

    def describe(self) -> str:
        parts = []
        for kind, changes in (
            ("accepted", self.accepted),
            ("safe", self.safe),
            ("schema", self.schema),
        ):
            if changes:
                parts.append(f"{kind}: {', '.join(map(str, changes))}")
        return "; ".join(parts) or "no change"


class ConfigChangedError(ConfigError):
    """The resumed config changes fields that define the run."""


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


def _plain(config: Any) -> dict[str, Any]:
    """A config (ConfigDict or dict) as JSON would store it: tuples become lists, placeholders
    None; so a saved config and a live one compare field by field."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(as_dict, default=str))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _covered(field: str, prefixes: Iterable[str]) -> bool:
    return any(field == p or field.startswith(p + ".") for p in prefixes)


def parse_allowed(allowed: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"optim.lr, batch_size"`` or a sequence of names → the names."""
    if allowed is None:
        return ()
    items = allowed.split(",") if isinstance(allowed, str) else allowed
    return tuple(item.strip() for item in items if item and item.strip())


def diff_on_resume(
    saved: Mapping[str, Any] | Any,
    new: Mapping[str, Any] | Any,
    allowed: str | Sequence[str] | None = None,
    safe_fields: Sequence[str] = SAFE_FIELDS,
) -> ConfigDiff:
    """Compare the checkpoint's ``saved`` config with the ``new`` one.

    ``allowed`` defaults to the new config's ``allow_config_change`` (comma-separated dotted
    keys; a key also accepts its whole subtree, e.g. ``optim``). Raises ``ConfigChangedError``
    naming every defining field that changed (old → new) and the flag that accepts them, or
    a ``ConfigError`` when ``allowed`` names a field neither config has.
    """
    old_flat, new_flat = _flatten(_plain(saved)), _flatten(_plain(new))
    if allowed is None:
        allowed = new_flat.get(ALLOW_KEY)
    accepted_names = parse_allowed(allowed)
    known = set(old_flat) | set(new_flat)
    for name in accepted_names:
        if not any(_covered(key, [name]) for key in known):
            closest = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {closest[0]}?" if closest else ""
            raise ConfigError(f"--config.{ALLOW_KEY} names {name!r}, which no config has{hint}")
    safe, accepted, schema, refused = [], [], [], []
    for field in sorted(known):
        old, value = old_flat.get(field, _ABSENT), new_flat.get(field, _ABSENT)
        if old == value or field == ALLOW_KEY:
            continue
        change = Change(field, old, value)
        if _ABSENT in (old, value):
            schema.append(change)
        elif _covered(field, safe_fields):
            safe.append(change)
        elif _covered(field, accepted_names):
            accepted.append(change)
        else:
            refused.append(change)
    if refused:
        names = ",".join(c.field for c in refused)
        raise ConfigChangedError(
            "this config would resume the checkpoint as a different run: "
            f"{'; '.join(map(str, refused))}. Start a new --workdir, or accept the change with "
            f"--config.{ALLOW_KEY}={names}"
        )
    return ConfigDiff(tuple(safe), tuple(accepted), tuple(schema))
