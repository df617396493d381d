"""Peak dense bf16 FLOP/s per accelerator, for MFU. Unknown devices (CPUs) have no peak."""

from __future__ import annotations

import jax

# (substring of jax's device_kind, lower case) -> peak dense bf16 FLOP/s per device (chip).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),  # TPU v5p reports "TPU v5"
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first local one), None when unknown."""
    device = device or jax.local_devices()[0]
    kind = device.device_kind.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return None
