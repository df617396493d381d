r"""Speed-measurement presets: model shapes to compare against, not training recipes.

  python -m sycoca_jax.tools.benchmark --config=configs/benchmark.py:openclip_b32 \
      --sweep='batch_size=128,256;model.attention_impl=xla,cudnn'
  python -m sycoca_jax.tools.benchmark --config=configs/benchmark.py:b16,objective=sycoca

Arguments (comma separated ``key=value``; a bare word is the preset):
  preset     openclip_b32 | b16
  objective  coca (default for openclip_b32) | sycoca (default for b16) | clip (b16 only)

- ``openclip_b32``: open_clip 3.3.0's ``coca_ViT-B-32`` itself, the reference measured with
  open_clip (``sycoca_jax.interop.open_clip_presets``, as ``configs/open_clip.py`` builds it):
  ViT-B/32 at 224 px with a class token (50 tokens), a text side of width 512 with 12 unimodal
  and 12 two-block multimodal layers (self-attention + MLP, then cross-attention + MLP),
  vocabulary 49408, 76 text tokens (+ the appended CLS), open_clip's single attentional pooler
  (256 queries), LayerNorm epsilon 1e-5 and exact GELU: 101.1 GFLOP per training example.
  (Until 2026-12-01 it had no class token and one MLP per multimodal layer, 89.1 GFLOP, 12 %
  less than open_clip's model; the H200 figures in docs/performance.md say which they used.)
- ``b16``: ``configs/sycoca.py:size=B/16`` with ``model.remat=dots_attention_gelu``, as the GPU
  recipe trains it.

Both run their layer stacks with no loop (``model.scan_unroll=0``), as the GPU recipe does.

Both run in bfloat16 at batch 256 unless overridden; data, evaluators and the schedule are those
of ``configs/sycoca.py`` and unused by the benchmark.
"""

from __future__ import annotations

import os

import ml_collections

from sycoca_jax.config_args import load_config, parse_arg
from sycoca_jax.interop import open_clip_presets

PRESETS = {
    # scan_unroll=0: the layer stacks run with no loop (parameters still stacked). Compiled for
    # an H200, the B/32 step then moves 169 GB outside matrix products instead of 393 and
    # launches 4,077 kernels instead of 7,413; SyCoCa-B/16 397 GB instead of 466
    # (docs/performance.md). model.scan_unroll=1 gives the loop back.
    "openclip_b32": dict(
        size="B/32", objective="coca", open_clip="coca_ViT-B-32", model=dict(scan_unroll=0)
    ),
    # Remat: without it SyCoCa-B/16 at batch 256 needs 125 GiB (out of memory on a 141 GB H200);
    # with remat=dots 40 GiB, and CoCa-B/16 runs faster than without (217 vs 250 ms per step).
    # dots_attention_gelu also keeps q/k/v after their bias, the attention kernels' outputs and
    # the GELU: compiled for an H200, 286 GB outside matrix products and attention instead of
    # 372 and 140 attention kernels instead of 208, for 12 GiB more (docs/performance.md).
    "b16": dict(
        size="B/16", objective="sycoca", model=dict(remat="dots_attention_gelu", scan_unroll=0)
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, positional="preset", preset="openclip_b32", objective="")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown benchmark preset {args.preset!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    objective = args.objective or preset["objective"]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sycoca.py")
    config = load_config(f"{path}:size={preset['size']},objective={objective}")
    if "open_clip" in preset:
        config.model.update(open_clip_presets.model_config(preset["open_clip"], objective))
    config.model.update(preset.get("model", {}))
    config.batch_size = 256
    return config
