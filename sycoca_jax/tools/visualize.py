r"""Pictures of attentive masking on a trained run's evaluation images.

  python -m sycoca_jax.tools.visualize --workdir=/tmp/sycoca_tiny [--num=16] [--out=DIR] \
      [--split=test] [--step=N]

Writes ``<out>/<k>.png`` for the first ``num`` images of the split (default: the training
data's evaluation split; ``out`` defaults to ``<workdir>/pictures``) and ``<out>/grid.png``
with all rows: the image, its relevance heat map for the reference caption, the patches the
captioner keeps, the patches TG-MIM hides, TG-MIM's reconstruction, and the reference and
generated captions (``sycoca_jax.tools.pictures``). A model without a branch shows what the
attentive selection at that branch's ratio *would* pick (titles say so).

``pictures(...)`` gives the same rows as arrays (e.g. for TensorBoard).
The tool draws SyCoCa's internals (TG-MIM's reconstruction is no predict function), so it works
on the ``SyCoCa`` module of the run's config rather than through ``evaluation.predict``.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from PIL import Image

from sycoca_jax import binaries, decoding, evaluate
from sycoca_jax import checkpoint as ckpt
from sycoca_jax.data import pipeline
from sycoca_jax.data.tokenizer import load_tokenizer
from sycoca_jax.evaluation.common import EvalContext
from sycoca_jax.models import build, masking
from sycoca_jax.models.sycoca import SyCoCa
from sycoca_jax.tools import pictures as drawing


def relevance(model: SyCoCa, params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """(B, N) relevance of each patch to its caption, as the model's attentive masking scores it
    (``model.score_mode``)."""
    inputs = model.apply({"params": params}, images, tokens, method=model.relevance_inputs)
    return masking.relevance_scores(
        inputs["patch_embeddings"],
        inputs["token_embeddings"],
        inputs["token_valid"],
        model.score_mode,
        inputs["temperature"],
    )


@functools.partial(jax.jit, static_argnums=(0,))
def masking_views(
    model: SyCoCa, params: Any, images: jax.Array, tokens: jax.Array, rng: jax.Array
) -> dict[str, jax.Array]:
    """What the training forward does with (images, their captions): ``relevance`` (B, N),
    ``kept`` and ``hidden`` (B, N) bool, ``prediction`` (B, N, p*p*3) when there is TG-MIM.
    Where a branch is off, ``kept``/``hidden`` are what attentive selection would pick."""
    scores = relevance(model, params, images, tokens)
    out = model.apply({"params": params}, images, tokens, rngs={"masking": rng})
    n = model.num_patches
    if "caption_indices" in out:
        kept = masking.indices_to_mask(out["caption_indices"], n)
    else:
        keep = masking.static_count(n, model.caption_keep_ratio, "caption_keep_ratio")
        kept = masking.indices_to_mask(masking.keep_most_relevant(scores, keep), n)
    views = {"relevance": scores, "kept": kept}
    if "tgmim_mask" in out:
        views["hidden"] = out["tgmim_mask"]
        views["prediction"] = out["tgmim_prediction"]
    else:
        count = masking.static_count(n, model.tgmim_mask_ratio, "tgmim_mask_ratio")
        hidden = masking.mask_most_relevant(scores, count)[1]
        views["hidden"] = masking.indices_to_mask(hidden, n)
    return views


def titles(model: SyCoCa) -> tuple[str, ...]:
    """Panel titles (short enough for a 128-pixel panel) saying which selections the model
    really makes: "kept"/"hidden" with the branch's masking, "would keep/hide" where the branch
    is off."""
    attentive = model.use_captioning and model.caption_masking != "none"
    keep = f"kept ({model.caption_masking})" if attentive else "would keep"
    hide = f"hidden ({model.tgmim_masking})" if model.use_tgmim else "would hide"
    recon = "reconstruction" if model.use_tgmim else "(no TG-MIM)"
    return ("image", model.score_mode, keep, hide, recon)


def pictures(
    model: SyCoCa, params: Any, images: Any, tokens: Any, seed: int = 0, scale: int = 2
) -> np.ndarray:
    """(B, H, W, 3) uint8 rows of ``pictures.PANELS`` (no text): for TensorBoard."""
    views = jax.device_get(masking_views(model, params, images, tokens, jax.random.key(seed)))
    return drawing.panel_rows(
        np.asarray(images),
        views["relevance"],
        views["kept"],
        views["hidden"],
        views.get("prediction"),
        model.patch_size,
        scale=scale,
        normalised_targets=model.norm_pix_loss,
    )


@functools.partial(jax.jit, static_argnums=(0, 2))
def _greedy(model: SyCoCa, params: Any, num_tokens: int, images: jax.Array) -> jax.Array:
    return decoding.caption_images(
        model, params, images, method="greedy", num_tokens=num_tokens
    ).tokens


def load_run(workdir: str, step: int | None = None) -> tuple[SyCoCa, EvalContext, int]:
    """(model, EvalContext, step) of a training workdir, with the config its checkpoint saved."""
    checkpointer = ckpt.Checkpointer(workdir, max_to_keep=None, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ckpt.CheckpointNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    finally:
        checkpointer.close()
    context, step = evaluate.load_for_eval(config, workdir, step)
    return build.from_config(config.model), context, step


def write_pictures(
    workdir: str,
    out: str | None = None,
    num: int = 16,
    split: str | None = None,
    step: int | None = None,
    seed: int = 0,
) -> list[pathlib.Path]:
    """Writes the PNGs (module docstring) and returns their paths."""
    model, context, step = load_run(workdir, step)
    config = context.config
    mesh = context.placement.mesh
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-num // shards) * shards
    dataset = pipeline.make_eval_dataset(config, "validation", split=split, batch_size=batch_size)
    host = dataset[0]
    real = np.flatnonzero(host["mask"])[:num]
    images, tokens = host["image"], host["tokens"]
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.name)
    with context.placement.context():
        rows = pictures(model, context.params, images, tokens, seed)
        generated = None
        if model.use_captioning:
            generated = np.asarray(_greedy(model, context.params, tokenizer.vocab_size, images))
    out_dir = pathlib.Path(out or pathlib.Path(workdir) / "pictures")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, canvases = [], []
    for k, row in enumerate(real):
        lines = [f"reference: {tokenizer.decode(tokens[row])}"]
        lines.append(
            f"generated: {tokenizer.decode(generated[row])}"
            if generated is not None
            else "generated: (no captioning head)"
        )
        canvas = drawing.row_image(rows[row], lines, titles(model))
        path = out_dir / f"{k:03d}.png"
        canvas.save(path)
        paths.append(path)
        canvases.append(canvas)
    grid = Image.new("RGB", (canvases[0].width, sum(c.height for c in canvases)), "white")
    top = 0
    for canvas in canvases:
        grid.paste(canvas, (0, top))
        top += canvas.height
    grid.save(out_dir / "grid.png")
    logging.info("wrote %d pictures of step %d to %s", len(paths), step, out_dir)
    return [*paths, out_dir / "grid.png"]


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training workdir (checkpoints with their config).")
    flags.DEFINE_integer("num", 16, "Images to draw.")
    flags.DEFINE_string("out", None, "Output folder (default <workdir>/pictures).")
    flags.DEFINE_string("split", None, "Split (default: config.data.eval_split).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("seed", 0, "Noise for random masking.")
    flags.mark_flags_as_required(["workdir"])


def main(f: flags.FlagValues) -> None:
    for path in write_pictures(f.workdir, f.out, f.num, f.split, f.step, f.seed):
        print(path)


if __name__ == "__main__":
    binaries.run_tool(main, define_flags)
