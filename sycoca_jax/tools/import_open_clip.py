r"""Import open_clip CoCa weights into an Orbax checkpoint that training, evaluation and transfer
start from.

Start from open_clip CoCa weights (``coca_ViT-B-32``, ``coca_ViT-L-14``, ``coca_base``)::

  python -m sycoca_jax.tools.import_open_clip --model=coca_ViT-B-32 \
      --weights=open_clip_model.safetensors --workdir=/runs/coca_b32_import --objective=sycoca
  python -m sycoca_jax.main --config=configs/open_clip.py:model=coca_ViT-B-32,data=cc3m \
      --config.init.checkpoint=/runs/coca_b32_import --workdir=/runs/sycoca_b32
  python -m sycoca_jax.tools.export_open_clip --workdir=/runs/sycoca_b32 \
      --out=/runs/sycoca_b32.safetensors

``evaluate`` and ``transfer`` read the imported (or trained) workdir like any other:
``python -m sycoca_jax.evaluate --config=configs/open_clip.py:model=coca_ViT-B-32,data=cc3m
--workdir=/runs/coca_b32_import`` and ``python -m sycoca_jax.transfer ... --init=/runs/...``.

The weights are read with ``safetensors`` (no torch needed). A pickled ``.bin``/``.pt`` file is
refused, never unpickled: convert it once where torch is installed (the error shows how).
``--model`` is a preset name or an open_clip model config (``.json``); every open_clip key must be
present and none may be left over (a mismatch lists them). ``--objective=sycoca`` adds a freshly
initialised TG-MIM head (listed in the log); ``coca`` (the default) imports only what open_clip
has. ``--scan`` picks the parameter layout (default: the preset's; ``main`` needs its config's).
The checkpoint (step 0) holds the parameters and a config with the model fields and the tokenizer
reference (``clip_bpe``: CLIP's BPE from the installed open_clip package).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags, logging
from etils import epath
from flax import linen as nn

from sycoca_jax import binaries
from sycoca_jax import checkpoint as ckpt
from sycoca_jax.data import tokenizer as tokenizers
from sycoca_jax.errors import UserError
from sycoca_jax.interop import open_clip_presets, open_clip_weights
from sycoca_jax.models import sycoca


class WorkdirNotEmptyError(UserError, FileExistsError):
    """The import would mix its step 0 with checkpoints already in the workdir."""


def build_config(
    model: str,
    objective: str = "coca",
    scan: bool | None = None,
    cls_mask: str = "legacy",
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """The config stored with the imported weights: the model fields and the tokenizer."""
    fields = open_clip_presets.model_config(model, objective)
    fields["cls_mask"] = cls_mask
    if scan is not None:
        fields["scan"] = scan
    if tokenizer is None:
        tokenizer = open_clip_presets.TOKENIZERS.get(model, ("clip_bpe",))[0]
    return dict(
        size=os.path.basename(model),
        objective=objective,
        model=fields,
        data=dict(name=None, tokenizer=tokenizer),
        open_clip=dict(model=model, cls_mask=cls_mask),
    )


def new_heads_init(model: sycoca.SyCoCa, seed: int) -> Any:
    """Parameters of the heads open_clip lacks (the TG-MIM decoder), created by running only that
    head: initialising the whole model would compile its whole forward pass."""

    def create(m: sycoca.SyCoCa) -> None:
        dtype = jnp.dtype(m.dtype)
        m.tgmim_decoder(
            jnp.zeros((1, 1, m.image_width), dtype),
            jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1, m.max_text_len, m.text_width), dtype),
            jnp.ones((1, m.max_text_len), bool),
        )

    init = jax.jit(lambda rng: model.init({"params": rng}, method=create)["params"])
    return nn.unbox(init(jax.random.key(seed)))


def _check_tokenizer(reference: str | None, fields: dict[str, Any]) -> None:
    """Warn early when the tokenizer the config names cannot be loaded here or does not fit the
    model (training and evaluation refuse such a pair; the weights themselves are fine)."""
    try:
        tokenizers.check_model_fits(tokenizers.load_tokenizer(reference), fields)
    except (FileNotFoundError, ValueError) as e:
        logging.warning("tokenizer %s: %s", reference, e)


def import_open_clip(
    model: str,
    weights: str,
    workdir: str,
    objective: str = "coca",
    scan: bool | None = None,
    cls_mask: str = "legacy",
    tokenizer: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``weights`` (an open_clip CoCa state dict) as step 0 of ``workdir``; returns what
    was done (``tensors``, ``new_heads``, ``checkpoint``)."""
    directory = epath.Path(workdir) / ckpt.CHECKPOINT_DIR
    if directory.exists() and any(directory.iterdir()):
        raise WorkdirNotEmptyError(
            f"{workdir} already holds checkpoints; import into a new --workdir"
        )
    config = build_config(model, objective, scan, cls_mask, tokenizer)
    fields = config["model"]
    _check_tokenizer(config["data"]["tokenizer"], fields)
    net = sycoca.SyCoCa(**fields)
    state = open_clip_weights.read_safetensors(weights)
    params, new_heads = open_clip_weights.to_params(state, net, lambda: new_heads_init(net, seed))
    if new_heads:
        logging.info("freshly initialised (open_clip has no such head): %s", ", ".join(new_heads))
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    try:
        config["open_clip"]["weights"] = os.path.abspath(weights)
        checkpointer.save(0, {"params": params}, config=config, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    where = str(directory / "0")
    logging.info("imported %d open_clip tensors from %s into %s", len(state), weights, where)
    return dict(tensors=len(state), new_heads=new_heads, checkpoint=where, config=config)


def main(f: flags.FlagValues) -> None:
    done = import_open_clip(
        f.model, f.weights, f.workdir, f.objective, f.scan, f.cls_mask, f.tokenizer, f.seed
    )
    print(
        f"wrote {done['checkpoint']}: {done['tensors']} open_clip tensors"
        + (f"; new: {', '.join(done['new_heads'])}" if done["new_heads"] else "")
    )


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    flags.DEFINE_string("model", None, "open_clip model name (coca_ViT-B-32, ...) or config .json")
    flags.DEFINE_string("weights", None, "the open_clip state dict, .safetensors")
    flags.DEFINE_string("workdir", None, "where the checkpoint goes (a new directory)")
    flags.DEFINE_enum("objective", "coca", list(open_clip_presets.OBJECTIVES), "heads to build")
    flags.DEFINE_bool("scan", None, "stacked (scanned) layers; default: the preset's")
    flags.DEFINE_enum("cls_mask", "legacy", ["legacy", "corrected"], "the weights' CLS mask")
    flags.DEFINE_string("tokenizer", None, "tokenizer reference; default: the preset's")
    flags.DEFINE_integer("seed", 0, "seed of the new heads")
    flags.mark_flags_as_required(["model", "weights", "workdir"])


if __name__ == "__main__":
    binaries.run_tool(main, define_flags)  # the input's faults (UserError) in one line
