"""Per-chip specs (peak dense bf16 FLOP/s, HBM size and bandwidth): the one table behind MFU,
roofline estimates and will-it-fit checks. Unknown devices (CPUs) have no spec.

Figures are the vendors' published per-chip numbers (Cloud TPU system-architecture pages; NVIDIA
data sheets for the SXM parts, dense, without sparsity). A TPU v4/v5p chip is one JAX device
(megacore); on v5e/v6e a chip is one device too.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """What one accelerator chip (one JAX device) can do at best."""

    name: str
    peak_bf16_flops: float  # dense, per second
    hbm_gib: float  # memory per device, GiB
    hbm_bytes_per_s: float  # memory bandwidth

    def roofline_seconds(self, flops: float, bytes_accessed: float) -> float:
        """Lower bound on the time of a program doing ``flops`` and moving ``bytes_accessed``
        through HBM on this chip: whichever of compute and memory traffic takes longer."""
        return max(flops / self.peak_bf16_flops, bytes_accessed / self.hbm_bytes_per_s)


# Keyed by TPU generation (compile_for's names) and by GPU model.
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("TPU v4", 275e12, 32.0, 1200e9),
    "v5e": ChipSpec("TPU v5e", 197e12, 16.0, 819e9),
    "v5p": ChipSpec("TPU v5p", 459e12, 95.0, 2765e9),
    "v6e": ChipSpec("TPU v6e", 918e12, 32.0, 1640e9),
    "h200": ChipSpec("NVIDIA H200", 989e12, 141.0 * 1e9 / 2**30, 4.8e12),
    "h100": ChipSpec("NVIDIA H100 SXM", 989e12, 80.0 * 1e9 / 2**30, 3.35e12),
    "a100": ChipSpec("NVIDIA A100 SXM 80GB", 312e12, 80.0 * 1e9 / 2**30, 2.039e12),
}

# (substring of jax's lower-cased device_kind, key of CHIPS), most specific first.
_DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    ("v6 lite", "v6e"),  # TPU v6e (Trillium) reports "TPU v6 lite"
    ("v6e", "v6e"),
    ("v5 lite", "v5e"),  # TPU v5e reports "TPU v5 lite"
    ("v5e", "v5e"),
    ("v5p", "v5p"),
    ("v5", "v5p"),  # TPU v5p reports "TPU v5"
    ("v4", "v4"),
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
)


def chip_spec(device: jax.Device | str | None = None) -> ChipSpec | None:
    """The spec of ``device`` (a device, its ``device_kind``, or the first local device)."""
    if device is None:
        device = jax.local_devices()[0]
    kind = (device if isinstance(device, str) else device.device_kind).lower()
    for key, chip in _DEVICE_KINDS:
        if key in kind:
            return CHIPS[chip]
    return None


def peak_flops_per_device(device: jax.Device | str | None = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first local one), None when unknown."""
    spec = chip_spec(device)
    return None if spec is None else spec.peak_bf16_flops
