r"""Parameter counts per part and analytic forward FLOPs per example, with no real parameters.

  python -m sycoca_jax.tools.summary --config=configs/sycoca.py:size=B/16 [--json]

``--xla_check`` also compiles the forward on CPU and prints XLA's FLOP count beside ours.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from sycoca_jax import binaries, flops
from sycoca_jax.models import build


def summarize(model_config: Any) -> dict[str, Any]:
    """Parameter counts per part (``params``) and forward FLOPs per example, total and by part."""
    model = build.from_config(model_config)
    counts = build.param_counts(build.abstract_params(model))
    by_part = flops.forward_flops_per_example(model_config)
    return {"params": counts, "flops_per_example": by_part["total"], "flops_by_part": by_part}


def xla_forward_flops(model_config: Any, batch_size: int = 2) -> float:
    """XLA's FLOP estimate for one forward example (compiled for the local backend).

    Layers are unrolled for this: XLA counts a scanned loop body once, not once per layer.
    """
    model = build.from_config(model_config).clone(scan=False)
    params = build.abstract_params(model)
    images = jax.ShapeDtypeStruct((batch_size, model.image_size, model.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch_size, model.max_text_len + 1), jnp.int32)

    def forward(p, i, t):
        return model.apply({"params": p}, i, t, rngs={"masking": jax.random.key(0)})

    cost = jax.jit(forward).lower(params, images, tokens).compile().cost_analysis()
    if isinstance(cost, list):  # older jax returns one dict per computation
        cost = cost[0]
    return float(cost["flops"]) / batch_size


def _format(summary: dict[str, Any]) -> str:
    lines = [f"{'part':<22}{'params':>16}{'fwd GFLOP/example':>22}"]
    by_part = summary["flops_by_part"]
    for part, count in summary["params"].items():
        if part == "total":
            continue
        gflop = by_part.get(part)
        lines.append(f"{part:<22}{count:>16,}{'' if gflop is None else f'{gflop / 1e9:.3f}':>22}")
    for part in by_part:
        if part not in summary["params"] and part != "total":
            lines.append(f"{part:<22}{'':>16}{by_part[part] / 1e9:>22.3f}")
    lines.append(
        f"{'total':<22}{summary['params']['total']:>16,}{summary['flops_per_example'] / 1e9:>22.3f}"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = binaries.config_from_flags()
    summary = summarize(config.model)
    if flags.FLAGS.xla_check:
        summary["xla_flops_per_example"] = xla_forward_flops(config.model)
    if flags.FLAGS.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "flops_by_part"}))
    else:
        print(_format(summary))
        if "xla_flops_per_example" in summary:
            ratio = summary["xla_flops_per_example"] / summary["flops_per_example"]
            print(
                f"XLA cost analysis: {summary['xla_flops_per_example'] / 1e9:.3f} GFLOP "
                f"({ratio:.3f}x the analytic count)"
            )


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.DEFINE_bool("xla_check", False, "Also report XLA's cost analysis (CPU).")


if __name__ == "__main__":
    define_flags()
    binaries.run_app(main)
