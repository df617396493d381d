r"""Where a traced step's device time went, without TensorBoard's profile plugin.

  python -m sycoca_jax.tools.trace_summary --trace_dir=WORKDIR/profile --steps=2

Reads the newest ``*.trace.json.gz`` that ``jax.profiler.trace(..., create_perfetto_trace=True)``
wrote under a folder (``config.profile_steps`` and ``tools.benchmark --trace_dir`` both write
one) and reports, per traced step: the device's busy time (the union of its kernels' intervals,
so overlapping streams are not counted twice), the kernel time by kind (matrix products,
attention, copies, everything else: fusions of elementwise work and reductions) and the kernels
that took the most. Busy time well under the step time means the device waited (on the host, on
transfers); a small matrix-product share means the step is bound by the rest.

Kernels are the events on a device's stream lines (GPUs: ``/device:GPU:N``, ``Stream #...``);
TPUs and CPUs have no stream lines, so their XLA operation lines stand in.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
from typing import Any

from absl import app, flags

from sycoca_jax import binaries

# Lower-cased substrings of kernel names, first match wins. Hopper's cuBLAS kernels are
# "nvjet_*" and "sm90_xmma_*"; XLA's own Triton GEMMs carry "gemm" in their fusion's name.
_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attn", "sdpa", "cudnn_generated_fort_native")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "matmul", "wgmma", "convolution", "dot")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
)


def kernel_kind(name: str) -> str:
    """``attention``, ``matmul``, ``copy`` or ``other`` for a kernel or operation name."""
    lower = name.lower()
    for kind, needles in _KINDS:
        if any(n in lower for n in needles):
            return kind
    return "other"


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, duration)`` intervals."""
    total, end = 0.0, float("-inf")
    for start, duration in sorted(intervals):
        stop = start + duration
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def find_trace(trace_dir: str | pathlib.Path) -> pathlib.Path:
    """The newest perfetto trace under ``trace_dir``; a clear error when there is none."""
    found = pathlib.Path(trace_dir).glob("**/*.trace.json.gz")
    found = sorted(found, key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no *.trace.json.gz under {trace_dir}: trace with "
            "jax.profiler.trace(..., create_perfetto_trace=True)"
        )
    return found[-1]


def _device_threads(events: list[dict]) -> dict[tuple[int, int], str]:
    """(pid, tid) -> line name of every line of a device process."""
    processes = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    found = {k: v for k, v in threads.items() if k[0] in devices}
    # CPU: the client thread that runs XLA's compiled programs.
    return found or {k: v for k, v in threads.items() if v.startswith("tf_XLAPjRtCpuClient")}


def _kernel_lines(threads: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    """The lines that hold device kernels: GPU streams, else XLA's operation lines."""
    streams = {k: v for k, v in threads.items() if v.startswith("Stream")}
    return streams or {k: v for k, v in threads.items() if v == "XLA Ops"} or threads


def summarize(path: str | pathlib.Path, steps: int, top: int = 8) -> dict[str, Any]:
    """Per-step device busy time, kernel time by kind and the ``top`` kernels, in ms; where
    kernels come from GPU streams, also the ``top`` XLA operations with the start of their HLO
    (``ops``: which fusion, copy or custom call the kernels belong to)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads = _device_threads(events)
    lines = _kernel_lines(threads)
    kernels = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in lines]
    if not kernels:
        names = sorted({str(e.get("args", {}).get("name")) for e in events if e.get("ph") == "M"})
        raise ValueError(f"{path}: no device kernels on the lines {names[:12]}")
    per_name: collections.Counter[str] = collections.Counter()
    per_kind: collections.Counter[str] = collections.Counter()
    for e in kernels:
        per_name[e["name"]] += e.get("dur", 0.0)
        per_kind[kernel_kind(e["name"])] += e.get("dur", 0.0)
    busy = busy_microseconds([(e["ts"], e.get("dur", 0.0)) for e in kernels])
    window = max(e["ts"] + e.get("dur", 0.0) for e in kernels) - min(e["ts"] for e in kernels)

    def ms(us: float) -> float:
        return round(us / 1e3 / steps, 3)

    summary = {
        "lines": sorted(set(lines.values())),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "busy_ms": ms(busy),
        "window_ms": ms(window),
        "kernel_ms": ms(sum(per_kind.values())),
        "by_kind_ms": {kind: ms(us) for kind, us in per_kind.most_common()},
        "top": [[_short(name), ms(us)] for name, us in per_name.most_common(top)],
    }
    op_lines = {k for k, v in threads.items() if v == "XLA Ops"} - set(lines)
    ops = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in op_lines]
    if ops:
        per_op: collections.Counter[str] = collections.Counter()
        text: dict[str, str] = {}
        for e in ops:
            per_op[e["name"]] += e.get("dur", 0.0)
            args = e.get("args") or {}
            text.setdefault(e["name"], str(args.get("long_name") or args.get("hlo_op") or ""))
        summary["ops"] = [
            [_short(name), ms(us), _short(text[name], 160)] for name, us in per_op.most_common(top)
        ]
    return summary


def _short(name: str, width: int = 90) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 1] + "…"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    path = find_trace(f.trace_dir)
    print(json.dumps({"trace": str(path), **summarize(path, f.steps, f.top)}, indent=1))


def define_flags() -> None:
    flags.DEFINE_string("trace_dir", None, "Folder holding a jax.profiler trace.", required=True)
    flags.DEFINE_integer("steps", 1, "Steps in the traced window (the figures are per step).")
    flags.DEFINE_integer("top", 8, "Kernels to list.")


if __name__ == "__main__":
    define_flags()
    binaries.run_app(binaries.guard(main, (FileNotFoundError, ValueError)))
