"""Paper estimates from a compiled program: its FLOPs and HBM bytes (XLA's cost analysis), the
roofline lower bound on its step time on a chip, and the MFU that bound leaves at most; and the
per-chip memory of the contrastive loss at a large global batch.

XLA's cost analysis counts the body of a loop (``nn.scan`` over layers) once, whatever its trip
count, so for a scanned model its FLOPs and bytes cover roughly one layer per stack. The roofline
then uses the analytic FLOP count (``sycoca_jax.flops``) and scales XLA's bytes by the same
undercount, and says so (``cost_complete: false``); compile with ``--config.model.scan=false``
for XLA's exact figures.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sycoca_jax import hardware, losses, sharding


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(cost or {})


def step_cost(
    compiled: Any, analytic_flops_per_device: float, chip: hardware.ChipSpec, scanned: bool
) -> dict[str, Any]:
    """FLOPs, bytes, roofline step time and MFU ceiling of one compiled step on one chip.

    The compiled SPMD program is one device's share, so XLA's figures are per device. MFU counts
    the analytic (model) FLOPs only, so recomputation (remat) and elementwise work lower the
    ceiling, as they lower the real MFU.
    """
    cost = _cost(compiled)
    xla_flops = float(cost.get("flops", 0.0))
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    report: dict[str, Any] = {
        "xla_tflop_per_device": round(xla_flops / 1e12, 4),
        "xla_gb_accessed_per_device": round(xla_bytes / 1e9, 3),
        "analytic_tflop_per_device": round(analytic_flops_per_device / 1e12, 4),
    }
    if "optimal_seconds" in cost:  # the TPU compiler's own estimate
        report["xla_optimal_seconds"] = float(cost["optimal_seconds"])
    if not xla_flops or not xla_bytes:
        report["roofline_seconds"] = None
        return report
    flops, bytes_accessed = xla_flops, xla_bytes
    complete = not (scanned and xla_flops < analytic_flops_per_device)
    if not complete:
        undercount = analytic_flops_per_device / xla_flops
        flops, bytes_accessed = analytic_flops_per_device, xla_bytes * undercount
    seconds = chip.roofline_seconds(flops, bytes_accessed)
    compute_s = flops / chip.peak_bf16_flops
    report.update(
        cost_complete=complete,
        roofline_seconds=seconds,
        bound="compute" if compute_s >= bytes_accessed / chip.hbm_bytes_per_s else "memory",
        arithmetic_intensity=round(flops / bytes_accessed, 1),
        mfu_ceiling=round(analytic_flops_per_device / (seconds * chip.peak_bf16_flops), 4),
    )
    return report


def contrastive_loss_memory(
    mesh: Mesh, rules: sharding.Rules, batch_size: int, embed_dim: int
) -> dict[str, Any]:
    """Compile the contrastive loss and its gradient alone for ``batch_size`` embeddings split
    over the mesh's batch axes; report what one device holds against the full B×B float32
    logits. Sharded, the temporaries scale as B²/devices; replicated they would be B² each."""
    batch = jax.ShapeDtypeStruct(
        (batch_size, embed_dim), jnp.float32, sharding=sharding.batch_sharding(mesh)
    )
    temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))

    def loss(image, text, t):
        return losses.itc_loss(image, text, t)[0]

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    with sharding.model_context(mesh, rules):
        compiled = grad.lower(batch, batch, temperature).compile()
    memory = compiled.memory_analysis()
    logits_bytes = 4 * batch_size**2
    devices = mesh.size
    temp = memory.temp_size_in_bytes if memory is not None else None
    return {
        "contrastive_batch": batch_size,
        "devices": devices,
        "full_logits_gib": round(logits_bytes / 2**30, 3),
        "logits_share_gib": round(logits_bytes / devices / 2**30, 4),
        "temp_gib_per_device": None if temp is None else round(temp / 2**30, 4),
        # Temporaries in units of one device's share of the logits: a small constant (a few
        # B×B/devices buffers: logits, both log-softmaxes, their gradient) when sharded; about
        # ``devices`` times that if every device held the whole matrix.
        "temp_over_logits_share": None if temp is None else round(temp * devices / logits_bytes, 2),
    }
