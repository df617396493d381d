"""tools.kernel_census on programs compiled here (CPU): a loop's body launches once per trip, an
elementwise kernel moves its inputs and output, a dynamic-update-slice moves its update and not
the buffer it updates in place, a layer stack's sources merge across layers; and
tools.compile_for_gpu's target description and its refusal without jax's CUDA plugin."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sycoca_jax.tools import compile_for_gpu, kernel_census
from tests.helpers import ROOT


def _census(fn, *args):
    return kernel_census.kernels(jax.jit(fn).lower(*args).compile().as_text())


def _launches(fn, *args) -> int:
    return sum(k.launches for k in _census(fn, *args))


def _loop(trips: int):
    def fn(x):
        # exp then a reduction and a broadcast: more than one kernel per trip on any backend
        return jax.lax.fori_loop(0, trips, lambda i, y: y - jnp.exp(y).sum(0, keepdims=True), x)

    return fn


def test_a_loop_body_launches_once_per_trip():
    x = jnp.ones((64, 256), jnp.float32)
    counts = [_launches(_loop(n), x) for n in (4, 8, 12)]
    per_trip = (counts[1] - counts[0]) / 4
    assert per_trip >= 1
    assert counts[2] - counts[1] == counts[1] - counts[0]


def test_an_elementwise_kernel_moves_its_inputs_and_output():
    x = jnp.ones((500, 1000), jnp.float32)
    [kernel] = _census(lambda a, b: a * b + 1.0, x, x)
    assert kernel.launches == 1 and kernel.kind == "fusion"
    assert kernel.bytes == 3 * x.size * 4


def test_an_in_place_update_moves_the_update_not_the_buffer():
    rows, width = 64, 4096
    buffer = jnp.zeros((rows, width), jnp.float32)

    def fill(buffer):
        def body(i, b):
            row = jnp.full((1, width), i, jnp.float32) * 2.0
            return jax.lax.dynamic_update_slice(b, row, (i, 0))

        return jax.lax.fori_loop(0, rows, body, buffer)

    updates = [k for k in _census(fill, buffer) if k.kind == "dynamic-update-slice"]
    assert updates and sum(k.launches for k in updates) == rows
    row_bytes, buffer_bytes = width * 4, rows * width * 4
    for k in updates:
        assert k.bytes_per_launch <= 2 * row_bytes + 64 < buffer_bytes


def test_a_layer_cut_from_a_stacked_array_moves_the_layer_not_the_stack():
    """With ``model.scan_unroll=0`` each layer's weights are a ``slice`` of the stacked array;
    counting the whole stack per layer made the B/16 step look 14 GB heavier than it is."""
    layers, rows, width = 12, 256, 512
    stack = jnp.ones((layers, rows, width), jnp.float32)
    layer_bytes = rows * width * 4
    [kernel] = _census(lambda w: w[3] * 2.0, stack)  # slice fused with its consumer
    assert kernel.bytes == 2 * layer_bytes
    program = f"""HloModule m
ENTRY %main (w: f32[{layers},{rows},{width}]) -> f32[1,{rows},{width}] {{
  %w = f32[{layers},{rows},{width}]{{2,1,0}} parameter(0)
  ROOT %s = f32[1,{rows},{width}]{{2,1,0}} slice(%w), slice={{[3:4], [0:{rows}], [0:{width}]}}
}}
"""
    [kernel] = kernel_census.kernels(program)  # a slice on its own
    assert kernel.bytes == 2 * layer_bytes


def test_a_library_calls_scratch_space_is_not_counted_as_traffic():
    """cuBLAS returns a 32 MiB workspace beside each product (seen in the H200 program)."""
    call = 'custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"'
    program = f"""HloModule m
ENTRY %main (a: bf16[64,32], b: bf16[32,16]) -> bf16[64,16] {{
  %a = bf16[64,32]{{1,0}} parameter(0)
  %b = bf16[32,16]{{1,0}} parameter(1)
  %c = (bf16[64,16]{{1,0}}, s8[33554432]{{0}}) {call}
  ROOT %d = bf16[64,16]{{1,0}} get-tuple-element(%c), index=0
}}
"""
    [kernel] = kernel_census.kernels(program)
    assert kernel.kind == "matmul" and kernel.launches == 1
    assert kernel.bytes == (64 * 16 + 64 * 32 + 32 * 16) * 2


def test_sources_merge_across_layers_and_phases_are_named():
    assert kernel_census._source("jit(step)/jvp(SyCoCa)/text/block_3/mlp/fc1/dot_general") == (
        "text/block_*/mlp/fc1/dot_general"
    )
    assert kernel_census._source(
        "jit(step)/transpose(jvp(SyCoCa))/image/encoder/rematted_computation/blocks/add"
    ) == ("image/encoder/blocks/add")
    assert kernel_census._phase("jit(step)/transpose(jvp(SyCoCa))/text/mlp") == "backward"
    assert kernel_census._phase("jit(step)/jvp(SyCoCa)/text/mlp") == "forward"
    assert kernel_census._phase("jit(step)/adam/mul") == "update"
    assert kernel_census._phase("") == "unattributed"


def test_summary_adds_up_and_estimates_the_non_matmul_time():
    x = jnp.ones((128, 128), jnp.float32)
    launched = _census(lambda a: jnp.tanh(a @ a).sum(), x)
    report = kernel_census.summarise(launched, bandwidth_bytes_per_s=1e9)
    assert report["kernels_per_step"] == sum(k.launches for k in launched)
    assert sum(row["launches"] for row in report["by_kind"].values()) == report["kernels_per_step"]
    assert report["non_matmul_ms_at_bandwidth"] == pytest.approx(
        report["non_matmul_gb_per_step"] * 1e3, abs=0.2
    )
    assert "kernels per step" in kernel_census.format_report(report)


def test_the_command_reads_a_dumped_program_and_refuses_other_text(tmp_path, capsys):
    program = tmp_path / "step.hlo"
    program.write_text(jax.jit(jnp.sin).lower(jnp.ones(8)).compile().as_text())
    assert kernel_census.main([str(program), "--json"]) == 0
    assert '"kernels_per_step": 1' in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("not a program")
    assert kernel_census.main([str(tmp_path / "notes.txt")]) == 2
    assert "no ENTRY computation" in capsys.readouterr().err


def test_gpu_target_descriptions_carry_the_chip_and_unknown_gpus_fail():
    text = compile_for_gpu.target_config("h200")
    assert "core_count: 132" in text and "major: 9" in text
    assert "device_memory_size: 141000000000" in text  # hardware.CHIPS: 141 GB
    assert "memory_bandwidth: 4800000000000" in text
    with pytest.raises(ValueError, match="unknown --gpu 'b100'"):
        compile_for_gpu.target_config("b100")


@pytest.mark.skipif(compile_for_gpu.cuda_plugin_missing() is None, reason="plugin installed")
def test_without_the_cuda_plugin_the_tool_says_how_to_install_it():
    reason = compile_for_gpu.cuda_plugin_missing()
    assert reason and "jax[cuda12]==" in reason


GPU_CASES = {
    "one_h200": ["--gpu=h200"],
    # The 8xH100 recipe's layout (batch over 8 GPUs, FSDP) with cuDNN attention: jax's cuDNN
    # partitioner refused the attentional pooler's broadcast queries beside batch-split keys
    # ("Query, key and value should have same sharding") until attention._cudnn constrained
    # the three to one sharding.
    "eight_h100_fsdp_cudnn": [
        "--gpu=h100",
        "--num_gpus=8",
        "--config.model.attention_impl=cudnn",
        "--config.model.dtype=bfloat16",
        "--config.mesh.shape=(1,-1,1)",
        "--config.mesh.rules=fsdp",
        "--config.batch_size=64",
    ],
    # The GPU presets' layer layout: scanned stacks with no loop, rematerialised.
    "one_h200_scan_without_loop_remat": [
        "--gpu=h200",
        "--config.model.scan=true",
        "--config.model.scan_unroll=0",
        "--config.model.remat=dots",
    ],
    # The B/16 preset's remat, which keeps cuDNN attention's forward outputs.
    "one_h200_cudnn_dots_attention_gelu": [
        "--gpu=h200",
        "--config.model.attention_impl=cudnn",
        "--config.model.dtype=bfloat16",
        "--config.model.remat=dots_attention_gelu",
    ],
}


@pytest.mark.skipif(compile_for_gpu.cuda_plugin_missing() is not None, reason="no CUDA plugin")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_the_tiny_step_compiles_for_gpus_without_one(case, tmp_path):
    """Where jax's CUDA plugin is installed (no GPU needed), the command compiles and counts."""
    config = f"--config={ROOT / 'configs' / 'sycoca.py'}:tiny"
    command = [sys.executable, "-m", "sycoca_jax.tools.compile_for_gpu", config, "--json"]
    command += [f"--hlo_dir={tmp_path}"]
    result = subprocess.run(
        command + GPU_CASES[case], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["fits"] is True and report["kernels_per_step"] > 100
    if "dots_attention" in " ".join(GPU_CASES[case]):  # no attention forward re-run backward
        launched = kernel_census.kernels((tmp_path / "point0.hlo").read_text())
        forwards = [k for k in launched if k.source.endswith("dot_product_attention_fwd")]
        assert forwards and all(k.phase == "forward" for k in forwards)
