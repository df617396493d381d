"""Config checks that run before any work: every numeric field of a pretraining config in one
place, and durations settable from flags (unknown keys: ``config_keys``).

Without them a cadence of 0 crashes with ``ZeroDivisionError`` after compiling, and a batch of -8
asks for "a multiple of 1".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from sycoca_jax.config_keys import get_field, has_field
from sycoca_jax.errors import ConfigError

# Durations given in exactly one unit (sycoca_jax.durations): the prefix, then _steps etc.
DURATIONS = ("total", "optim.warmup")
DURATION_UNITS = ("steps", "epochs", "examples")


# ------------------------------------------------------------------------------ durations
def apply_duration_overrides(config: Any, overrides: Mapping[str, Any]) -> list[str]:
    """Setting one unit of a duration on the command line clears the config's others.

    ``overrides`` maps the dotted keys given as ``--config.<key>=…`` to their values
    (``ml_collections.config_flags.get_override_values``). So ``--config.total_steps=N`` works
    on a preset that names ``total_epochs``. Two units of one duration on the command line are
    an error. Returns the cleared keys, for logging.
    """
    cleared = []
    for prefix in DURATIONS:
        given = [
            f"{prefix}_{unit}"
            for unit in DURATION_UNITS
            if overrides.get(f"{prefix}_{unit}") is not None
        ]
        if len(given) > 1:
            raise ConfigError(
                f"{' and '.join('--config.' + k for k in given)} are both given; a duration takes "
                "one unit: keep one of them"
            )
        if not given:
            continue
        parent_key, _, _ = prefix.rpartition(".")
        parent = get_field(config, parent_key) if parent_key else config
        for unit in DURATION_UNITS:
            key = f"{prefix}_{unit}"
            if key != given[0] and has_field(config, key) and get_field(config, key) is not None:
                parent[key.rsplit(".", 1)[-1]] = None
                cleared.append(key)
    return cleared


# ---------------------------------------------------------------------------- validation
class _Problems:
    """Collects one message per bad field, each naming the field, its value and the fix."""

    def __init__(self, config: Any):
        self.config = config
        self.lines: list[str] = []

    def value(self, key: str) -> Any:
        return get_field(self.config, key)

    def add(self, key: str, must: str, fix: str | None = None) -> None:
        value = self.value(key)
        fix = fix or f"set --config.{key}"
        self.lines.append(f"{key}={value!r} must be {must} ({fix})")

    def check(self, key: str, ok, must: str, fix: str | None = None, optional=False) -> None:
        if not has_field(self.config, key):
            return
        value = self.value(key)
        if value is None and optional:
            return
        try:
            good = value is not None and ok(value)
        except TypeError:
            good = False
        if not good:
            self.add(key, must, fix)

    def positive_int(self, key: str, optional: bool = False) -> None:
        self.check(key, lambda v: _is_int(v) and v > 0, "a positive integer", optional=optional)

    def non_negative_int(self, key: str, note: str = "") -> None:
        self.check(key, lambda v: _is_int(v) and v >= 0, f"an integer >= 0{note}")

    def fraction(self, key: str, low: float, high: float, closed: str = "[]") -> None:
        left = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
        right = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
        self.check(
            key,
            lambda v: _is_number(v) and left(v) and right(v),
            f"in {closed[0]}{low}, {high}{closed[1]}",
        )

    def one_of(self, key: str, choices: Iterable[str]) -> None:
        choices = tuple(choices)
        self.check(key, lambda v: v in choices, f"one of {', '.join(choices)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _durations(p: _Problems) -> None:
    for prefix, required in (("total", True), ("optim.warmup", False)):
        keys = [
            f"{prefix}_{unit}" for unit in DURATION_UNITS if has_field(p.config, f"{prefix}_{unit}")
        ]
        if not keys:
            continue
        given = [k for k in keys if p.value(k) is not None]
        if len(given) > 1:
            p.lines.append(
                f"{' and '.join(f'{k}={p.value(k)!r}' for k in given)} are all set; a duration "
                f"takes one unit (set one of them on the command line: it clears the others)"
            )
        elif required and not given:
            p.lines.append(f"no run length: set one of --config.{', --config.'.join(keys)}")
        low = 0 if prefix == "optim.warmup" else None
        for key in given:
            if low is None:
                p.check(key, lambda v: _is_number(v) and v > 0, "positive")
            else:
                p.check(key, lambda v: _is_number(v) and v >= 0, ">= 0")


def _model(p: _Problems) -> None:
    for key in (
        "model.image_size",
        "model.patch_size",
        "model.image_width",
        "model.image_depth",
        "model.image_heads",
        "model.image_mlp_dim",
        "model.vocab_size",
        "model.text_width",
        "model.text_depth",
        "model.text_heads",
        "model.text_mlp_dim",
        "model.embed_dim",
        "model.caption_queries",
        "model.pooler_heads",
        "model.decoder_width",
        "model.decoder_depth",
        "model.decoder_heads",
        "model.decoder_mlp_dim",
    ):
        p.positive_int(key)
    p.non_negative_int("model.multimodal_depth")
    p.check("model.max_text_len", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
    size, patch = p.value("model.image_size"), p.value("model.patch_size")
    if _is_int(size) and _is_int(patch) and size > 0 and patch > 0 and size % patch:
        p.add("model.image_size", f"a multiple of model.patch_size={patch}")
    for width, heads in (
        ("model.image_width", "model.image_heads"),
        ("model.text_width", "model.text_heads"),
        ("model.decoder_width", "model.decoder_heads"),
    ):
        w, h = p.value(width), p.value(heads)
        if _is_int(w) and _is_int(h) and w > 0 and h > 0 and w % h:
            p.add(width, f"divisible by {heads}={h}")
    p.fraction("model.caption_keep_ratio", 0.0, 1.0, "(]")
    p.fraction("model.tgmim_mask_ratio", 0.0, 1.0, "()")
    p.check("model.temperature_init", lambda v: _is_number(v) and v > 0, "positive")
    init, top = p.value("model.temperature_init"), p.value("model.temperature_max")
    if _is_number(init) and _is_number(top) and top < init:
        p.add("model.temperature_max", f">= model.temperature_init={init}")


def _loss(p: _Problems) -> None:
    weights = ("loss.itc_weight", "loss.caption_weight", "loss.tgmim_weight")
    for key in weights:
        p.check(key, lambda v: _is_number(v) and v >= 0, ">= 0")
    present = [k for k in weights if has_field(p.config, k)]
    if present and all(_is_number(p.value(k)) and p.value(k) == 0 for k in present):
        p.lines.append("every loss weight is 0: nothing to train (set --config.loss.itc_weight)")
    for weight, switch in (
        ("loss.caption_weight", "model.use_captioning"),
        ("loss.tgmim_weight", "model.use_tgmim"),
    ):
        if _is_number(p.value(weight)) and p.value(weight) > 0 and p.value(switch) is False:
            p.add(
                weight,
                f"0 while {switch} is False",
                f"set --config.{switch}=True or the weight to 0",
            )
    p.fraction("loss.label_smoothing", 0.0, 1.0, "[)")


def _optim(p: _Problems) -> None:
    p.check("optim.lr", lambda v: _is_number(v) and v > 0, "positive")
    p.fraction("optim.b1", 0.0, 1.0, "[)")
    p.fraction("optim.b2", 0.0, 1.0, "[)")
    p.check("optim.eps", lambda v: _is_number(v) and v > 0, "positive")
    p.check("optim.weight_decay", lambda v: _is_number(v) and v >= 0, ">= 0")
    p.check(
        "optim.grad_clip",
        lambda v: _is_number(v) and v >= 0,
        ">= 0 (0 = no clipping)",
        optional=True,
    )
    p.one_of("optim.schedule", ("cosine", "linear", "constant"))
    p.fraction("optim.end_lr_fraction", 0.0, 1.0)


def _cadence(p: _Problems) -> None:
    p.positive_int("batch_size")
    p.positive_int("microbatches")
    batch, micro = p.value("batch_size"), p.value("microbatches")
    if _is_int(batch) and _is_int(micro) and batch > 0 and micro > 0 and batch % micro:
        p.add("batch_size", f"divisible by microbatches={micro}")
    p.check("seed", _is_int, "an integer")
    p.positive_int("log_every_steps")
    p.positive_int("checkpoint_every_steps")
    p.non_negative_int("eval_every_steps", " (0 = never)")
    if _is_int(p.value("eval_every_steps")) and p.value("eval_every_steps") > 0:
        p.positive_int("eval_batches")
    p.positive_int("keep_checkpoints", optional=True)
    p.non_negative_int("tensorboard_pictures", " (0 = none)")
    p.check("profile_steps", _profile_steps_ok, "FIRST,LAST with 1 <= FIRST <= LAST, or empty")


def _profile_steps_ok(value: Any) -> bool:
    from sycoca_jax.train import profiling  # jax: only when the field is set

    try:
        profiling.parse_steps(value)
    except ValueError:
        return False
    return True


def _data(p: _Problems) -> None:
    p.non_negative_int("data.num_workers", " (0 = inline)")
    p.one_of("data.prefetch", ("thread", "process"))
    p.positive_int("data.prefetch_buffer_size")
    p.non_negative_int("data.device_prefetch", " (0 = none)")
    p.check(
        "data.crop_scale",
        lambda v: len(v) == 2 and all(map(_is_number, v)) and 0 < v[0] <= v[1] <= 1,
        "two area fractions (low, high) with 0 < low <= high <= 1",
    )
    p.positive_int("data.min_image_size")
    p.fraction("data.max_skipped_fraction", 0.0, 1.0)
    p.one_of("data.image_decoder", ("pil", "tfds"))
    p.check("data.shuffle_seed", _is_int, "an integer")


def _mesh(p: _Problems, num_devices: int | None) -> None:
    from sycoca_jax import sharding  # jax: only when there is a mesh to check

    p.one_of("mesh.rules", sorted(sharding.RULE_PRESETS))
    shape = p.value("mesh.shape")
    if shape is None:
        return
    sizes = list(shape)
    if (
        len(sizes) != len(sharding.MESH_AXES)
        or not all(map(_is_int, sizes))
        or any(s == 0 or s < -1 for s in sizes)
        or sizes.count(-1) > 1
    ):
        p.add(
            "mesh.shape",
            f"{len(sharding.MESH_AXES)} sizes {sharding.MESH_AXES}, positive with at most one -1",
            "e.g. --config.mesh.shape='(-1, 1, 1)'",
        )
        return
    if num_devices is None:
        return
    try:
        data, fsdp, _ = sharding.resolve_mesh_shape(sizes, num_devices)
    except ValueError as error:
        p.lines.append(f"mesh.shape={tuple(sizes)}: {error}")
        return
    batch, micro = p.value("batch_size"), p.value("microbatches") or 1
    if _is_int(batch) and batch > 0 and _is_int(micro) and micro > 0 and batch % micro == 0:
        if (batch // micro) % (data * fsdp):
            p.add(
                "batch_size",
                f"a multiple of microbatches × data × fsdp = {micro} × {data} × {fsdp} "
                f"= {micro * data * fsdp} on {num_devices} devices",
            )


def _evals(p: _Problems) -> None:
    evals = p.value("evals")
    for name in evals.keys() if evals is not None else ():
        prefix = f"evals.{name}"
        p.positive_int(f"{prefix}.batch_size")
        p.non_negative_int(f"{prefix}.every_steps", " (0 = only by sycoca_jax.evaluate)")
        p.check(
            f"{prefix}.num_examples",
            lambda v: _is_int(v) and (v == -1 or v > 0),
            "-1 (the whole split) or positive",
        )
        p.positive_int(f"{prefix}.num_beams")
        p.check(f"{prefix}.temperature", lambda v: _is_number(v) and v > 0, "positive")
        p.non_negative_int(f"{prefix}.top_k", " (0 = no top-k)")
        p.fraction(f"{prefix}.top_p", 0.0, 1.0, "(]")
        p.positive_int(f"{prefix}.max_len", optional=True)


def validate(config: Any, num_devices: int | None = None) -> None:
    """Raise one ``ConfigError`` listing every bad field of a pretraining config (each with its
    value, the rule and the fix), before anything is loaded or compiled.

    ``num_devices`` also checks the mesh against the devices and the batch against the mesh.
    """
    p = _Problems(config)
    _cadence(p)
    _durations(p)
    _optim(p)
    _model(p)
    _loss(p)
    _data(p)
    _evals(p)
    if has_field(config, "mesh"):
        _mesh(p, num_devices)
    if p.lines:
        raise ConfigError("invalid config: " + "; ".join(p.lines))
