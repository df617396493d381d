r"""Continue pretraining an open_clip CoCa as SyCoCa (or CoCa), in open_clip's exact architecture.

The model is open_clip 3.3.0's ``model`` (``sycoca_jax.interop.open_clip_presets``: its shapes,
class token, LayerNorm epsilon 1e-5, exact GELU, legacy CLS mask, two-block multimodal layers),
plus a new TG-MIM head for ``objective=sycoca``; its tokenizer is CLIP's BPE (``clip_bpe``: the
vocabulary of the installed open_clip package). Everything else (data, optimiser, mesh,
evaluations) is ``configs/sycoca.py``'s for the same data. Start from imported weights:

  python -m sycoca_jax.tools.import_open_clip --model=coca_ViT-B-32 \
      --weights=open_clip_model.safetensors --workdir=/runs/coca_b32_import --objective=sycoca
  python -m sycoca_jax.main --config=configs/open_clip.py:model=coca_ViT-B-32,data=cc3m \
      --config.init.checkpoint=/runs/coca_b32_import --workdir=/runs/sycoca_b32

(``config.init.subtrees`` lists the parts open_clip provides; the TG-MIM head starts fresh.)

Arguments (comma separated ``key=value``; a bare word is the model):
  model      coca_ViT-B-32 | coca_ViT-L-14 | coca_base | coca_tiny (the layout at the tiny size,
             for CPUs and the embedded data, with its bundled tokenizer) | path/to/model.json
             (an open_clip model config)
  objective  sycoca | coca
  data       shapes | cc3m | cc12m
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from sycoca_jax.config_args import parse_arg
from sycoca_jax.interop import open_clip_presets


def _base_config(arg: str) -> ml_collections.ConfigDict:
    """``configs/sycoca.py:<arg>`` (the file next to this one)."""
    path = pathlib.Path(__file__).with_name("sycoca.py")
    spec = importlib.util.spec_from_file_location("_sycoca_base_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(
        arg, positional="model", model="coca_ViT-B-32", objective="sycoca", data="shapes"
    )
    tiny = args.model == "coca_tiny"
    config = _base_config(
        f"size={'tiny' if tiny else 'B/16'},objective={args.objective},data={args.data}"
    )
    fields = open_clip_presets.model_config(args.model, args.objective)
    config.size = args.model
    config.model.update(fields)
    config.data.tokenizer = open_clip_presets.TOKENIZERS.get(args.model, ("clip_bpe",))[0]
    config.init.subtrees = open_clip_presets.imported_subtrees(fields)
    return config
