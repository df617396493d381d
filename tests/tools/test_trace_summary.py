"""tools.trace_summary: busy time is the union of kernel intervals (checked against a NumPy
timeline), kernels are read from a device's stream lines, kinds follow the kernel names that
cuBLAS, cuDNN and XLA give, and a real jax.profiler trace condenses."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax.tools import trace_summary


def test_busy_time_is_the_union_of_intervals():
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 1000, 60)
    durations = rng.integers(1, 80, 60)
    timeline = np.zeros(1100, bool)
    for s, d in zip(starts, durations, strict=True):
        timeline[s : s + d] = True
    intervals = [(float(s), float(d)) for s, d in zip(starts, durations, strict=True)]
    assert trace_summary.busy_microseconds(intervals) == timeline.sum()
    assert trace_summary.busy_microseconds([]) == 0


@pytest.mark.parametrize(
    "name,kind",
    [
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("gemm_fusion_dot_123", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("loop_add_fusion_7", "other"),
        ("input_reduce_fusion_2", "other"),
        ("Memcpy DtoD (Device -> Device)", "copy"),
    ],
)
def test_kernel_kinds(name, kind):
    assert trace_summary.kernel_kind(name) == kind


def _write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_device_stream_lines_are_summarised_per_step(tmp_path):
    """Two overlapping streams on a GPU; the host's events and the XLA Ops line are not
    kernels and are not counted."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "python"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #7"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "Stream #8"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "XLA Ops"}},
    ]
    kernels = [  # (tid, start us, duration us, name)
        (7, 0, 400, "nvjet_hsh_gemm"),
        (7, 500, 100, "loop_add_fusion"),
        (8, 300, 300, "cudnn_generated_fort_native_sdpa_flash"),
        (7, 1000, 400, "nvjet_hsh_gemm"),
    ]
    events = meta + [
        {"ph": "X", "pid": 2, "tid": t, "ts": s, "dur": d, "name": n} for t, s, d, n in kernels
    ]
    events += [
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5000, "name": "PjitFunction(step)"},
        {"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 1400, "name": "fusion.1"},
    ]
    _write_trace(tmp_path / "host.trace.json.gz", events)
    found = trace_summary.find_trace(tmp_path)
    summary = trace_summary.summarize(found, steps=2, top=2)
    assert summary["lines"] == ["Stream #7", "Stream #8"]
    assert summary["kernels_per_step"] == 2.0
    assert summary["busy_ms"] == pytest.approx(1.0 / 2)  # [0, 600) and [1000, 1400)
    assert summary["window_ms"] == pytest.approx(1.4 / 2)
    assert summary["kernel_ms"] == pytest.approx(1.2 / 2)
    assert summary["by_kind_ms"] == {"matmul": 0.4, "attention": 0.15, "other": 0.05}
    attention = "cudnn_generated_fort_native_sdpa_flash"
    assert summary["top"] == [["nvjet_hsh_gemm", 0.4], [attention, 0.15]]
    assert summary["ops"] == [["fusion.1", 0.7, ""]]  # the XLA operation line, named apart


def test_a_real_trace_condenses(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    jax.block_until_ready(f(a))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        jax.block_until_ready([f(a) for _ in range(3)])
    summary = trace_summary.summarize(trace_summary.find_trace(tmp_path), steps=3)
    assert summary["kernels_per_step"] > 0 and summary["kernel_ms"] > 0
    assert 0 < summary["busy_ms"] <= summary["window_ms"] + 1e-6
    assert summary["busy_ms"] <= summary["kernel_ms"] + 1e-6


def test_a_folder_without_a_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="create_perfetto_trace=True"):
        trace_summary.find_trace(tmp_path)
