r"""Steady-state training-step speed of a config on the devices present, on synthetic batches.

  python -m sycoca_jax.tools.benchmark --config=configs/sycoca.py:size=B/16 \
      --config.batch_size=256 [--steps=20] [--warmup=3] [--json]
  python -m sycoca_jax.tools.benchmark --config=configs/benchmark.py:openclip_b32 \
      --sweep='batch_size=128,256;model.remat=none,dots;model.attention_impl=xla,cudnn'

``--trace_dir=DIR`` also traces two more steps of each point and adds where their device time
went (``tools.trace_summary``: busy time, matmul/attention/other kernel time, top kernels).

One JSON line per point of the sweep (every combination of the listed values; one point without
``--sweep``), each compiled once: compile seconds, step milliseconds, samples/s, TFLOP/s and MFU
per device from the analytic FLOP count (``sycoca_jax.flops``; MFU is null where the chip's peak
is unknown, e.g. on CPUs), the compiled program's memory (``memory_analysis``: temporaries, and
with the state and batch the program's peak), the device's peak so far (``memory_stats``, where
the backend reports it), and the attentive-masking share: the masking computation (relevance
scores, top-k, gathers) jitted alone on the same shapes and timed in the same run, divided by the
step time. A point that fails (out of memory, a kernel that
does not support the shapes) prints its error and the sweep goes on; the exit status is then 1.

Imports only jax, flax, optax, orbax, ml_collections, absl and numpy, so it runs on a bare
accelerator host from a source checkout (``launch/device_benchmark.sh``). The input pipeline is
measured separately by ``python -m sycoca_jax.data.benchmark``.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from sycoca_jax import binaries, flops, hardware, sharding
from sycoca_jax.models import branches, masking, sycoca, vit
from sycoca_jax.models.text import caption_input_and_target
from sycoca_jax.tools import trace_summary
from sycoca_jax.tools.compile_for import NOMINAL_TRAIN_EXAMPLES
from sycoca_jax.train import setup as train_setup
from sycoca_jax.train import step as train_step

TRACE_STEPS = 2


def synthetic_batch(config: Any, batch_sharding: Any, seed: int = 0) -> dict[str, jax.Array]:
    """Random images and captions of realistic lengths, placed on the mesh."""
    rng = np.random.default_rng(seed)
    spec = train_setup.batch_spec(config)
    b, length = spec["tokens"].shape
    tokens = np.zeros((b, length), np.int32)
    m = config.model
    special = (m.pad_id, m.bos_id, m.eos_id)
    for i in range(b):
        n = int(rng.integers(length // 4, length - 1))
        words = rng.integers(4, m.vocab_size, n)
        words[np.isin(words, special)] = 4  # a plain word in every vocabulary
        tokens[i, 0], tokens[i, 1 : n + 1], tokens[i, n + 1] = m.bos_id, words, m.eos_id
    image_spec = spec["image"]
    if jnp.issubdtype(image_spec.dtype, jnp.integer):
        images = rng.integers(0, 256, image_spec.shape, dtype=np.uint8).astype(image_spec.dtype)
    else:
        images = rng.normal(size=image_spec.shape).astype(image_spec.dtype)
    return jax.device_put({"image": images, "tokens": tokens}, batch_sharding)


# ------------------------------------------------------------------------------------ sweeps
def parse_sweep(text: str) -> list[dict[str, str]]:
    """``'a=1,2;b.c=x'`` -> every combination: ``[{a: 1, b.c: x}, {a: 2, b.c: x}]``; an empty
    sweep is one point with no overrides."""
    axes = []
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        key, sep, values = part.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ValueError(f"--sweep part {part!r}: expected key=value1,value2,...")
        axes.append([(key.strip(), v) for v in choices])
    return [dict(combination) for combination in itertools.product(*axes)]


def _typed(key: str, text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--sweep {key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if current is None or isinstance(current, str):
        return text
    raise ValueError(f"--sweep cannot set {key} (a {type(current).__name__}); use --config.{key}")


def apply_point(config: Any, point: dict[str, str]) -> Any:
    """A copy of ``config`` with the point's ``dotted.key=value`` overrides, typed like the
    fields they replace; an unknown key is an error naming it."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for key, text in point.items():
            *parents, leaf = key.split(".")
            node = config
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise ValueError(f"--sweep key {key!r}: the config has no such field")
            node[leaf] = _typed(key, text, node[leaf])
    return config


# ------------------------------------------------------------------------------------ timing
def _time(fn: Any, args: tuple, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn(*args)`` (results discarded) after ``warmup`` calls."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def _attentive(m: Any) -> bool:
    return (m.use_captioning and m.caption_masking == "attentive") or (
        m.use_tgmim and m.tgmim_masking == "attentive"
    )


def _masking_only(
    model: sycoca.SyCoCa,
    images: jax.Array,
    patch_states: jax.Array,
    token_states: jax.Array,
    tokens: jax.Array,
) -> list[jax.Array]:
    """The attentive-masking part of ``SyCoCa.__call__`` alone (run as a method, bound to the
    model's parameters): relevance scores from the encoded patches and caption, the top-k
    selections, and the gathers that feed each branch."""
    text_input, _ = caption_input_and_target(tokens)
    relevance = branches.relevance(model, patch_states, token_states, text_input != model.pad_id)
    pixels = vit.patchify(images.astype(patch_states.dtype), model.patch_size)

    def gathered(indices):
        source = pixels if model.branch_encoding == "reencode" else model.patches(patch_states)
        return vit.gather_tokens(source, indices)

    outputs = []
    if model.use_captioning and model.caption_masking == "attentive":
        keep = masking.static_count(model.num_patches, model.caption_keep_ratio, "keep")
        outputs.append(gathered(masking.keep_most_relevant(relevance, keep)))
    if model.use_tgmim and model.tgmim_masking == "attentive":
        hidden = masking.static_count(model.num_patches, model.tgmim_mask_ratio, "mask")
        visible, masked = masking.mask_most_relevant(relevance, hidden)
        outputs += [gathered(visible), masking.indices_to_mask(masked, model.num_patches)]
    return outputs


def masking_seconds(setup: Any, params: Any, batch: dict, steps: int, warmup: int) -> float | None:
    """Seconds of the attentive masking on the batch's shapes, or None without attentive
    masking (CoCa, CLIP, random masking)."""
    model = setup.model
    if not _attentive(model):
        return None
    b, length = batch["tokens"].shape
    rng = np.random.default_rng(1)
    dtype = jnp.dtype(model.dtype)
    states = [
        rng.normal(size=(b, model.num_prefix_tokens + model.num_patches, model.image_width)),
        rng.normal(size=(b, length - 1, model.text_width)),
    ]
    states = [jax.device_put(x.astype(dtype), setup.placement.batch_sharding) for x in states]
    args = (params, batch["image"], *states, batch["tokens"])

    def run(params, *inputs):
        return model.apply({"params": params}, *inputs, method=_masking_only)

    with setup.placement.context():
        compiled = jax.jit(run).lower(*args).compile()
    return _time(compiled, args, steps, warmup)


def device_peak_gib() -> float | None:
    """The largest ``peak_bytes_in_use`` over the local devices (a high-water mark for the whole
    process: in a sweep it covers every point so far), None where the backend keeps none."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) / 2**30 if peaks and None not in peaks else None


def make_setup(config: Any, mesh: Any) -> train_setup.TrainSetup:
    """The run's setup with a nominal dataset size: epoch-based durations (every size but tiny)
    only set the schedule's length, never the compiled step."""
    return train_setup.make_setup(config, mesh, num_train_examples=NOMINAL_TRAIN_EXAMPLES)


def measured_ceilings(size: int | None = None, copy_mib: int | None = None) -> dict:
    """The first device's bf16 matrix-product rate and memory bandwidth, measured on random
    data: the datasheet peaks that MFU divides by are leads, these are what the chip does here.
    Accelerators get shapes that fill them; a CPU gets small ones, so this stays quick there."""
    cpu = jax.devices()[0].platform == "cpu"
    size = size or (512 if cpu else 8192)
    copy_mib = copy_mib or (16 if cpu else 1024)
    a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.bfloat16)
    matmul_s = _time(jax.jit(jnp.matmul), (a, b), 10, 2)
    x = jax.random.normal(jax.random.key(1), (copy_mib * 2**18,), jnp.float32)
    copy_s = _time(jax.jit(lambda x: x * 1.5), (x,), 10, 2)  # reads and writes x once
    return {
        "matmul_bf16_tflops": round(2 * size**3 / matmul_s / 1e12, 3),
        "copy_gb_per_s": round(2 * x.nbytes / copy_s / 1e9, 1),
    }


def _traced(step: Any, state: Any, trace_dir: str, steps: int) -> tuple[Any, dict]:
    """Run ``steps`` more steps under ``jax.profiler`` and condense the trace
    (``tools.trace_summary``: six kernels for the point's line, forty in ``summary.json`` beside
    the trace); a trace that cannot be read is reported, not fatal."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = step(state)
        jax.block_until_ready((state, metrics))
    try:
        details = trace_summary.summarize(trace_summary.find_trace(trace_dir), steps, top=40)
        with open(os.path.join(trace_dir, "summary.json"), "w") as f:
            json.dump(details, f, indent=1)
        short = {k: v[:6] if k in ("top", "ops") else v for k, v in details.items()}
        return state, short
    except (OSError, ValueError, KeyError) as e:
        return state, {"error": f"{type(e).__name__}: {e}"}


def benchmark(
    config: Any, steps: int = 20, warmup: int = 3, trace_dir: str | None = None
) -> dict[str, Any]:
    """Compile ``config``'s train step once and time it on one synthetic batch; with
    ``trace_dir``, also trace two more steps there and summarise where their time went."""
    mesh = sharding.make_mesh(config.mesh.shape)
    setup = make_setup(config, mesh)
    state = train_setup.initial_state(setup, config.seed)
    compiled, report = train_step.compile_train_step(setup)
    batch = synthetic_batch(config, setup.placement.batch_sharding)

    def step(state):
        return compiled(state, batch)

    metrics = None
    for _ in range(warmup):
        state, metrics = step(state)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    trace = None
    if trace_dir:
        state, trace = _traced(step, state, trace_dir, TRACE_STEPS)
    masking_s = masking_seconds(setup, state["params"], batch, steps, warmup)
    flops_per_step = flops.train_flops_per_example(config.model) * config.batch_size
    tflops = flops_per_step / seconds / mesh.size / 1e12
    peak = hardware.peak_flops_per_device()
    argument, temp = report.get("argument_gib"), report.get("temp_gib")
    # The new state is written over the donated old one, so arguments + temporaries is the
    # program's peak (the metrics it returns are a few scalars).
    compiled_peak = None if argument is None or temp is None else argument + temp
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": mesh.size,
        "batch_size": config.batch_size,
        "compile_s": round(report["compile_seconds"], 2),
        "step_ms": round(seconds * 1e3, 3),
        "samples_per_s": round(config.batch_size / seconds, 2),
        "samples_per_s_per_device": round(config.batch_size / seconds / mesh.size, 2),
        "tflops_per_device": round(tflops, 4),
        "mfu": None if peak is None else round(tflops * 1e12 / peak, 4),
        "analytic_gflop_per_sample": round(flops_per_step / config.batch_size / 1e9, 3),
        "temp_gib": None if temp is None else round(temp, 3),
        "compiled_peak_gib": None if compiled_peak is None else round(compiled_peak, 3),
        "device_peak_gib": device_peak_gib(),
        "masking_ms": None if masking_s is None else round(masking_s * 1e3, 3),
        "masking_share": None if masking_s is None else round(masking_s / seconds, 4),
        "loss": float(metrics["loss"]),
        **({} if trace is None else {"trace": trace}),
    }


def sweep(
    config: Any,
    points: list[dict[str, str]],
    steps: int,
    warmup: int,
    budget_s: float = 0,
    trace_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark each point in turn, printing its JSON line as soon as it is measured; points
    past ``budget_s`` seconds (0: no limit) are reported as skipped."""
    start = time.perf_counter()
    results = []
    for index, point in enumerate(points):
        line: dict[str, Any] = {"point": point}
        point_trace = os.path.join(trace_dir, f"point{index}") if trace_dir else None
        if budget_s and time.perf_counter() - start > budget_s:
            line["skipped"] = f"over the time budget of {budget_s:.0f} s"
        else:
            try:
                line.update(benchmark(apply_point(config, point), steps, warmup, point_trace))
            except Exception as e:  # one bad point must not lose the rest of the sweep
                traceback.print_exc(file=sys.stderr)
                line["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        print(json.dumps(line), flush=True)
        results.append(line)
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    config = binaries.config_from_flags()
    if not f.sweep and not f.json:
        result = benchmark(config, f.steps, f.warmup, f.trace_dir or None)
        for key, value in result.items():
            print(f"{key:<28}{value}")
        return
    try:
        points = parse_sweep(f.sweep)
        for point in points:  # a typo fails before the first compile, not after an hour
            apply_point(config, point)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    results = sweep(config, points, f.steps, f.warmup, f.time_budget_s, f.trace_dir or None)
    sys.exit(1 if any("error" in r for r in results) else 0)


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_integer("steps", 20, "Timed steps.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
    flags.DEFINE_bool("json", False, "Print one JSON line.")
    flags.DEFINE_string(
        "sweep",
        "",
        "Points to measure, 'key=v1,v2;key2=...' over config fields (every combination), one "
        "JSON line each, e.g. 'batch_size=128,256;model.remat=none,dots'.",
    )
    flags.DEFINE_float("time_budget_s", 0, "Skip the points left after this many seconds.")
    flags.DEFINE_string(
        "trace_dir",
        "",
        f"Also trace {TRACE_STEPS} steps of each point into this folder and add where their "
        "device time went (tools.trace_summary) to the point's line.",
    )


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
