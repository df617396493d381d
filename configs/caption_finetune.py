r"""Caption-only fine-tuning of a pretrained SyCoCa checkpoint (CoCa's captioning recipe), on the
pretraining trainer.

  python -m sycoca_jax.main --config=configs/caption_finetune.py:tiny \
      --config.init.checkpoint=/tmp/sycoca_tiny --workdir=/tmp/sycoca_tiny_captions

  python -m sycoca_jax.main --config=configs/caption_finetune.py:size=B/16,data=coco \
      --config.data.tokenizer=/data/tokenizers/cc3m_32k.model --config.model.vocab_size=32000 \
      --config.init.checkpoint=gs://bucket/runs/sycoca_b16_cc3m --workdir=...

Arguments (comma separated ``key=value``; a bare word is the size):
  size        tiny | S/16 | B/16 | B/32 | L/14: the pretraining run's (with its overrides, e.g.
              vocab_size); a part that does not fit is named by the trainer
  data        shapes | cc3m | cc12m | coco (``coco_captions``, Karpathy train+restval; val)
  itc_weight  0 (default: caption loss only, as CoCa's recipe) or a small value such as 0.1

It is ``configs/sycoca.py`` (loaded from this folder, so every pretraining field and the
trainer's behaviour are shared, not duplicated) with these changes:

- model: CoCa's switches (``use_tgmim=False``, ``caption_masking="none"``): the multimodal
  decoder sees every patch, as it does when captioning at inference; the TG-MIM decoder is not
  built;
- loss: ``caption_weight=1``, ``tgmim_weight=0``, ``itc_weight`` from the argument. With 0 the
  contrastive head gets no gradient while weight decay shrinks its projections and (cascade
  pooler) the captioning pooler beneath it changes: zero-shot and retrieval drift, and the
  trainer warns. Evaluate them from the pretraining checkpoint, or keep a small itc_weight;
- init: every pretrained part the model has (``init.subtrees``) is copied from
  ``config.init.checkpoint``: a fresh optimiser and schedule start at step 0. (``--config.resume``
  would instead restore the pretraining optimiser state and step, continuing its schedule, and
  fails on the TG-MIM decoder this model lacks);
- optimiser: a lower peak learning rate and a short schedule.
"""

from __future__ import annotations

import os

import ml_collections

from sycoca_jax.config_args import load_config, parse_arg

# Every SyCoCa part a CoCa model has (all but the TG-MIM decoder).
CAPTIONING_SUBTREES = (
    "image_encoder",
    "text_encoder",
    "multimodal_decoder",
    "caption_pooler",
    "contrastive_pooler",
    "image_projection",
    "text_projection",
    "log_temperature",
)


def pretraining_config(size: str, data: str) -> ml_collections.ConfigDict:
    """configs/sycoca.py with the CoCa objective (read from this file's folder)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sycoca.py")
    return load_config(f"{path}:size={size},objective=coca,data={data}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, positional="size", size="tiny", data="shapes", itc_weight=0.0)
    tiny = args.size == "tiny"
    if args.data == "coco":
        config = pretraining_config(args.size, "cc3m")
        config.data.name = "coco_captions"  # tfds build coco_captions (Karpathy splits)
        config.data.train_split = "train+restval"
        config.data.eval_split = "val"
        config.total_epochs = 10.0
    else:
        config = pretraining_config(args.size, args.data)
        if not tiny:
            config.total_epochs = 2.0
    config.model.caption_masking = "none"
    config.model.use_tgmim = False
    config.loss.caption_weight = 1.0
    config.loss.tgmim_weight = 0.0
    config.loss.itc_weight = args.itc_weight
    config.init.subtrees = CAPTIONING_SUBTREES
    config.optim.lr = 5e-4 if tiny else 1e-4
    if tiny:
        config.total_steps = 300
        config.optim.warmup_steps = 30
        config.checkpoint_every_steps = 300
        config.eval_every_steps = 100
    else:
        config.optim.warmup_steps = 500
    return config
