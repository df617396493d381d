r"""Captioning with and without the training-time patch selection at inference.

  python -m sycoca_jax.tools.caption_selection --workdir=RUN [--num=512] [--split=test]

A captioner trained with attentive masking sees ``caption_keep_ratio`` of the patches in
training but every patch when it captions at evaluation (FLIP reports such a gap). This scores
greedy captions of the same images four ways:

- ``full``: every patch (what ``evaluation.captioning`` does);
- ``random``: a random ``caption_keep_ratio`` of the patches;
- ``oracle``: the patches most relevant to the image's first reference caption (the training
  selection, which needs the caption: an upper bound, not a usable inference mode);
- ``self``: the patches most relevant to the model's own ``full`` caption (usable: two passes).

Prints and writes ``<workdir>/caption_selection.json`` (BLEU-4 and CIDEr per mode). Captioning
from chosen patches is a ``SyCoCa`` internal (``selected_image_tokens``), so the tool works on the
run's module rather than through ``evaluation.predict``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sycoca_jax import binaries, decoding
from sycoca_jax.data import pipeline
from sycoca_jax.data.tokenizer import SENTENCEPIECE_IDS, SpecialIds, load_tokenizer, pack_ids
from sycoca_jax.evaluation import caption_metrics
from sycoca_jax.models import masking
from sycoca_jax.models.sycoca import SyCoCa
from sycoca_jax.tools import visualize

MODES = ("full", "random", "oracle", "self")


@functools.partial(jax.jit, static_argnums=(0, 2))
def _caption(model: SyCoCa, params: Any, num_tokens: int, images, indices) -> jax.Array:
    """Greedy captions from the patches at ``indices`` (B, K), or all of them (None)."""
    variables = {"params": params}
    if indices is None:
        image_tokens = model.apply(variables, images, method=model.encode_image)["image_tokens"]
    else:
        image_tokens = model.apply(variables, images, indices, method=model.selected_image_tokens)
    return decoding.generate(
        model, params, image_tokens, method="greedy", num_tokens=num_tokens
    ).tokens


@functools.partial(jax.jit, static_argnums=(0, 2))
def _most_relevant(model: SyCoCa, params: Any, keep: int, images, tokens) -> jax.Array:
    return masking.keep_most_relevant(visualize.relevance(model, params, images, tokens), keep)


def _as_tokens(ids: np.ndarray, length: int, special: SpecialIds = SENTENCEPIECE_IDS) -> np.ndarray:
    """Generated ids (B, L) -> pipeline layout ``[bos, ids..., eos, pad]`` (B, length + 1)."""
    out = np.zeros((len(ids), length + 1), np.int32)
    for row, generated in enumerate(np.asarray(ids)):
        pieces = []
        for i in generated:
            if int(i) in (special.pad, special.eos):  # pad or eos ends a caption
                break
            pieces.append(int(i))
        out[row] = pack_ids(pieces, length, special)
    return out


def compare(workdir: str, num: int = 512, split: str = "test", seed: int = 0) -> dict[str, Any]:
    model, context, step = visualize.load_run(workdir)
    config, params = context.config, context.params
    if not model.use_captioning:
        raise ValueError(f"{workdir}: the model has no captioning head")
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.name)
    keep = masking.static_count(model.num_patches, model.caption_keep_ratio, "caption_keep_ratio")
    vocab = tokenizer.vocab_size
    predictions: dict[str, list[str]] = {mode: [] for mode in MODES}
    references: list[list[str]] = []
    rng = np.random.default_rng(seed)
    batches = pipeline.make_eval_dataset(config, "captioning", split=split, batch_size=128)
    with context.placement.context():
        for host in batches:
            real = np.flatnonzero(host["mask"])
            images = jnp.asarray(host["image"])
            first = [str(c[0]) for c in host["captions"]]
            reference_tokens = tokenizer.tokenize_batch(first, model.max_text_len)
            full = np.asarray(_caption(model, params, vocab, images, None))
            random = np.argsort(rng.random((len(images), model.num_patches)), axis=1)[:, :keep]
            oracle = _most_relevant(model, params, keep, images, jnp.asarray(reference_tokens))
            own = _as_tokens(full, model.max_text_len, tokenizer.special_ids)
            self_chosen = _most_relevant(model, params, keep, images, jnp.asarray(own))
            outputs = {
                "full": full,
                "random": _caption(model, params, vocab, images, jnp.asarray(random, jnp.int32)),
                "oracle": _caption(model, params, vocab, images, oracle),
                "self": _caption(model, params, vocab, images, self_chosen),
            }
            for mode, ids in outputs.items():
                ids = np.asarray(ids)
                predictions[mode].extend(tokenizer.decode(ids[r]) for r in real)
            for r in real:
                refs = host["captions"][r][host["caption_mask"][r]]
                references.append([str(x) for x in refs])
            if len(references) >= num:
                break
    references = references[:num]
    result: dict[str, Any] = dict(workdir=workdir, step=step, keep=keep, num=len(references))
    for mode in MODES:
        scores = caption_metrics.score_captions(
            predictions[mode][:num], references, metrics=("bleu", "cider")
        )
        result[mode] = {"bleu_4": scores["bleu_4"], "cider": scores["cider"]}
        result[f"{mode}_example"] = predictions[mode][0]
    pathlib.Path(workdir, "caption_selection.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training workdir with a captioning model.")
    flags.DEFINE_integer("num", 512, "Images to caption.")
    flags.DEFINE_string("split", "test", "Split.")
    flags.DEFINE_integer("seed", 0, "Seed of the random selection.")
    flags.mark_flags_as_required(["workdir"])


def main(f: flags.FlagValues) -> None:
    print(json.dumps(compare(f.workdir, f.num, f.split, f.seed), indent=2))


if __name__ == "__main__":
    binaries.run_tool(main, define_flags)
