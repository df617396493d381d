r"""Speed-measurement presets: model shapes to compare against, not training recipes.

  python -m sycoca_jax.tools.benchmark --config=configs/benchmark.py:openclip_b32 \
      --sweep='batch_size=128,256;model.attention_impl=xla,cudnn'
  python -m sycoca_jax.tools.benchmark --config=configs/benchmark.py:b16,objective=sycoca

Arguments (comma separated ``key=value``; a bare word is the preset):
  preset     openclip_b32 | b16
  objective  coca (default for openclip_b32) | sycoca (default for b16) | clip

- ``openclip_b32``: CoCa in open_clip's ``coca_ViT-B-32`` shapes, the reference measured with
  open_clip itself: image tower ViT-B/32 at 224 px (width 768, 12 layers, 12 heads, MLP 3072); a
  text side of width 512, 8 heads, MLP 2048, 12 unimodal + 12 multimodal layers; vocabulary
  49408, 76 text tokens (+ the appended CLS); embed 512; open_clip's single attentional pooler
  (256 queries, 8 heads, width 512: query 0 is the contrastive vector, queries 1-255 the
  captioning tokens). Parameter layout details that do not change the step's cost (LayerNorm
  epsilon, GELU flavour, the pooler's query LayerNorm) are configs/open_clip.py's business.
- ``b16``: ``configs/sycoca.py:size=B/16`` with ``model.remat=dots``, as the GPU recipe trains it.

Both run in bfloat16 at batch 256 unless overridden; data, evaluators and the schedule are those
of ``configs/sycoca.py`` and unused by the benchmark.
"""

from __future__ import annotations

import os

import ml_collections

from sycoca_jax.config_args import load_config, parse_arg

OPENCLIP_B32 = dict(
    image_size=224,
    patch_size=32,
    image_width=768,
    image_depth=12,
    image_heads=12,
    image_mlp_dim=3072,
    text_width=512,
    text_depth=12,
    multimodal_depth=12,
    text_heads=8,
    text_mlp_dim=2048,
    vocab_size=49408,
    max_text_len=76,
    embed_dim=512,
    pooler="single",
    caption_queries=256,
    pooler_heads=8,
    dtype="bfloat16",
)
PRESETS = {
    "openclip_b32": dict(size="B/32", objective="coca", model=OPENCLIP_B32),
    # remat=dots: without it SyCoCa-B/16 at batch 256 needs 125 GiB (out of memory on a 141 GB
    # H200); with it 40 GiB, and CoCa-B/16 runs faster than without (217 vs 250 ms per step).
    "b16": dict(size="B/16", objective="sycoca", model=dict(remat="dots")),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, positional="preset", preset="openclip_b32", objective="")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown benchmark preset {args.preset!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    objective = args.objective or preset["objective"]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sycoca.py")
    config = load_config(f"{path}:size={preset['size']},objective={objective}")
    config.model.update(preset["model"])
    config.batch_size = 256
    return config
