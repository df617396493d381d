"""Typed evaluator settings: the fields every evaluator shares, and the round trip between a
settings dataclass and a ``config.evals`` entry.

Each evaluator declares ``Settings``, a frozen dataclass subclassing ``EvalSettings`` with its own
fields and their defaults. ``config_entry`` turns one into a ``ConfigDict`` holding every field (so
each can be set with ``--config.evals.<entry>.<key>=...``), ``from_entry`` turns an entry back into
the dataclass, failing on keys the evaluator does not know and on values of the wrong type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

S = TypeVar("S", bound="EvalSettings")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Fields of every ``config.evals`` entry."""

    dataset: str | None = None  # None: the training data's dataset
    split: str = "test"
    batch_size: int = 256  # global, over all processes
    every_steps: int = 0  # > 0: also run during training, every that many steps and at the end
    num_examples: int = -1  # -1: the whole split
    # A model that cannot run this evaluation (e.g. captioning on a CLIP model): True fails before
    # any training or evaluation; False drops the entry with one log line.
    required: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.every_steps < 0:
            raise ValueError(f"every_steps={self.every_steps} must be >= 0 (0: not in training)")
        if self.num_examples == 0 or self.num_examples < -1:
            raise ValueError(f"num_examples={self.num_examples} must be > 0, or -1 for all")


def _field_type(hint: Any) -> type:
    """``int`` for ``int``, ``str`` for ``str | None``, ``tuple`` for ``tuple[str, ...]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    return typing.get_origin(hint) or hint


def field_types(cls: type[EvalSettings]) -> dict[str, type]:
    """Each field's value type (``Optional`` unwrapped)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _field_type(hints[f.name]) for f in dataclasses.fields(cls)}


def config_entry(kind: str, cls: type[EvalSettings], **fields: Any) -> ml_collections.ConfigDict:
    """A ``config.evals`` entry: ``kind`` and every field of ``cls`` (defaults, then ``fields``).
    Fields that are None become typed placeholders, so the command line can still set them."""
    settings = from_dict(cls, fields, f"config.evals entry of kind {kind!r}")
    entry: dict[str, Any] = {"kind": kind}
    for name, kind_type in field_types(cls).items():
        value = getattr(settings, name)
        entry[name] = config_dict.placeholder(kind_type) if value is None else value
    return ml_collections.ConfigDict(entry)


def _check_type(name: str, value: Any, expected: type) -> Any:
    if value is None:
        return value
    if expected is tuple and isinstance(value, list | tuple):
        return tuple(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ValueError(f"{name}={value!r} is not of type {expected.__name__}")
    return value


def from_dict(cls: type[S], values: dict[str, Any], where: str) -> S:
    """``cls(**values)``, with one-line errors naming ``where`` for an unknown key (listing the
    valid ones), a value of the wrong type, or a value out of range."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(types_)}")
    try:
        checked = {k: _check_type(k, v, types_[k]) for k, v in values.items()}
        return cls(**checked)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def from_entry(cls: type[S], entry: ml_collections.ConfigDict, where: str) -> S:
    """The settings of one ``config.evals`` entry (its ``kind`` dropped)."""
    values = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
    values.pop("kind", None)
    return from_dict(cls, values, where)
