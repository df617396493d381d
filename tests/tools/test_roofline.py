"""The per-chip spec table, roofline estimates from a compiled program's cost, and the
contrastive loss's memory split over the devices (∝ B²/devices, not B²)."""

from __future__ import annotations

import jax
import pytest

from sycoca_jax import hardware, sharding
from sycoca_jax.tools import roofline


@pytest.mark.parametrize(
    "kind, chip",
    [
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v5p", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
    ],
)
def test_device_kinds_map_to_one_spec(kind, chip):
    assert hardware.chip_spec(kind) is hardware.CHIPS[chip]
    assert hardware.peak_flops_per_device(kind) == hardware.CHIPS[chip].peak_bf16_flops


def test_unknown_devices_have_no_spec():
    assert hardware.chip_spec("cpu") is None
    assert hardware.peak_flops_per_device(jax.devices()[0]) is None  # the CPU running this


def test_roofline_is_the_slower_of_compute_and_memory():
    v5p = hardware.CHIPS["v5p"]
    assert v5p.roofline_seconds(459e12, 0) == pytest.approx(1.0)
    assert v5p.roofline_seconds(0, 2765e9) == pytest.approx(1.0)
    assert v5p.roofline_seconds(459e12, 2 * 2765e9) == pytest.approx(2.0)


class _Compiled:
    def __init__(self, flops, bytes_accessed):
        self.cost = {"flops": flops, "bytes accessed": bytes_accessed}

    def cost_analysis(self):
        return [self.cost]  # some jax versions return a list of one dict


def test_step_cost_compute_bound_and_ceiling():
    chip = hardware.CHIPS["v5p"]
    # XLA counts 10 % more than the analytic FLOPs (remat, elementwise); few bytes.
    report = roofline.step_cost(_Compiled(1.1e12, 1e9), 1e12, chip, scanned=False)
    assert report["cost_complete"] and report["bound"] == "compute"
    assert report["roofline_seconds"] == pytest.approx(1.1e12 / 459e12)
    assert report["mfu_ceiling"] == pytest.approx(1 / 1.1, abs=1e-4)


def test_step_cost_corrects_a_scan_counted_once():
    """A scanned model: XLA saw a quarter of the FLOPs (one layer per stack); the roofline
    uses the analytic count and scales the bytes by the same factor, and says so."""
    chip = hardware.CHIPS["v5e"]
    report = roofline.step_cost(_Compiled(1e12, 1e12), 4e12, chip, scanned=True)
    assert report["cost_complete"] is False and report["bound"] == "memory"
    assert report["roofline_seconds"] == pytest.approx(4e12 / 819e9)
    assert report["mfu_ceiling"] == pytest.approx(819e9 / 197e12, abs=1e-4)  # bandwidth-bound


def test_contrastive_loss_memory_is_split_over_the_devices():
    """B = 2048 embeddings: per-device temporaries fall 8× from one device to eight (B²/chips),
    a small constant times one device's share of the B×B float32 logits."""
    rules = sharding.fsdp_rules()
    one = roofline.contrastive_loss_memory(
        sharding.make_mesh((1, 1, 1), jax.devices()[:1]), rules, 2048, 64
    )
    eight = roofline.contrastive_loss_memory(sharding.make_mesh((-1, 1, 1)), rules, 2048, 64)
    assert eight["devices"] == 8 and one["full_logits_gib"] == eight["full_logits_gib"]
    assert one["temp_gib_per_device"] / eight["temp_gib_per_device"] > 6
    assert eight["temp_over_logits_share"] < 12  # a few B×B/devices buffers, not B×B each
