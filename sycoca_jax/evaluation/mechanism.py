"""Mechanism evaluation: does the text-guided relevance find the objects the caption describes?

Only for ``sycoca_shapes`` (plain or ``clutter``): its generator knows where every described
object is. For each image, the records' id gives back the generated scene
(``shapes_builder.regenerate``), from which each described shape's share of every patch is
rendered (``shapes.object_masks``); the caption is the record's first one, which names every
described shape by size, colour and kind. The model scores the patches against that caption as
attentive masking does in training (``SyCoCa.relevance_inputs`` -> ``masking.relevance_scores``)
and ``grounding`` turns scores and coverage into:

- ``caption_keep_precision``: share of the patches the captioner would keep that lie on a
  described object (random: the object share of the image);
- ``tgmim_mask_recall``: share of the object patches TG-MIM would hide (random: its mask ratio);
- ``relevance_auroc``: object vs other patches (random: 0.5); on ``clutter`` builds also
  ``relevance_vs_distractor_auroc``: described objects vs the undescribed distractors only;
- ``colour_word_hit`` / ``kind_word_hit``: the patch most similar to a colour (kind) word of
  the caption lies on a shape of that colour (kind) (random: the share of such patches);
  ``*_word_object_hit``: on any described shape; ``*_word_hit_given_object``: on the named
  shape when on some shape (``grounding.word_metrics``);
- ``probe_<score>_auroc``: the same AUROC for other ways of scoring patches from the same
  embeddings (``relevance_probes.CHEAP``), to tell a useless embedding from a useless score,
  and, when the entry's ``probes`` asks for them, for scores that cost more
  (``relevance_probes.COSTLY``), with their ``probe_<score>_keep_precision``.

Every metric is a mean over images (words for the word hits); ``random_*`` is what uniformly
random selection gets in expectation on the same images. Works for every objective (CLIP and
CoCa compute the scores they would use with attentive masking switched on).

``eval_config`` fields beyond the common ones: ``score_mode`` (None: the model's),
``min_coverage`` (a patch lies on an object from this share of its pixels).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from sycoca_jax import sharding
from sycoca_jax.data import clutter, pipeline, shapes, shapes_builder, sources, transforms
from sycoca_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, load_tokenizer
from sycoca_jax.evaluation import common, grounding, relevance_probes
from sycoca_jax.models import masking
from sycoca_jax.models.layers import l2_normalize
from sycoca_jax.models.sycoca import SyCoCa

MAX_OBJECTS = 3  # described shapes per scene (shapes.sample_scene draws 1 to 3)
# What ``ObjectTargets`` adds to a batch, gathered whole to every process with the scores.
TARGETS = (
    "mask",
    "tokens",
    "coverage",
    "distractor_coverage",
    "colour_tokens",
    "kind_tokens",
    "same_colour",
    "same_kind",
)
DEFAULTS: dict[str, Any] = dict(score_mode=None, min_coverage=grounding.MIN_COVERAGE, probes=())


def settings(eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    out = dict(DEFAULTS)
    for key in DEFAULTS:
        value = eval_config.get(key, None)
        if value is not None:
            out[key] = value
    return out


def check(eval_config: ml_collections.ConfigDict) -> None:
    """Fails before anything runs on data without object positions or a bad field."""
    if sources.base_name(eval_config.dataset) != "sycoca_shapes":
        raise ValueError(
            f"mechanism evaluation needs sycoca_shapes data (its generator knows where the "
            f"described objects are); got dataset {eval_config.dataset!r}"
        )
    shapes_builder.config_from_name(eval_config.dataset)  # a bad config name fails here
    s = settings(eval_config)
    if s["score_mode"] is not None and s["score_mode"] not in masking.SCORE_MODES:
        raise ValueError(
            f"mechanism score_mode={s['score_mode']!r}; choose from {masking.SCORE_MODES}"
        )
    unknown = sorted(set(s["probes"]) - set(relevance_probes.COSTLY))
    if unknown:
        raise ValueError(f"mechanism probes {unknown} unknown; known: {relevance_probes.COSTLY}")
    if not 0 < s["min_coverage"] <= 1:
        raise ValueError(f"mechanism min_coverage must be in (0, 1], got {s['min_coverage']}")


def word_tokens(tokenizer: Tokenizer, caption: str, max_text_len: int) -> tuple[np.ndarray, list]:
    """``tokenizer.tokenize(caption)`` and, per word of ``caption.split()``, the positions of its
    pieces in the tokens (words cut off by ``max_text_len`` get fewer or none)."""
    ids, spans = [], []
    for word in caption.split():
        pieces = tokenizer.encode(word)
        spans.append([1 + len(ids) + i for i in range(len(pieces))])  # +1: bos
        ids.extend(pieces)
    if ids != tokenizer.encode(caption):
        raise ValueError(f"tokenizer {tokenizer.name} does not split {caption!r} at spaces")
    tokens = tokenizer.tokenize_ids(ids, max_text_len)
    last = min(len(ids), max_text_len - 1)  # pieces kept after truncation
    return tokens, [[p for p in span if p <= last] for span in spans]


class ObjectTargets(transforms.RecordMap):
    """A ``sycoca_shapes`` record -> its first caption's ``tokens``, each described shape's
    patch ``coverage`` (MAX_OBJECTS, N), and per shape the token positions of its colour and
    kind words (``colour_tokens``/``kind_tokens`` (MAX_OBJECTS, L) bool) with which shapes share
    that colour/kind (``same_colour``/``same_kind`` (MAX_OBJECTS, MAX_OBJECTS))."""

    def __init__(
        self,
        dataset: str,
        spec: sources.DatasetSpec,
        tokenizer: Tokenizer,
        max_text_len: int,
        image_size: int,
        patch_size: int,
    ):
        self.config = shapes_builder.config_from_name(dataset)
        self.spec, self.tokenizer, self.max_text_len = spec, tokenizer, max_text_len
        self.image_size, self.patch_size = image_size, patch_size

    def apply(self, record: transforms.Record) -> transforms.Record:
        split, index = shapes_builder.parse_id(record["id"])
        example = shapes_builder.regenerate(self.config, split, index)
        caption = self.spec.captions(record)[0]
        if caption != example.captions[0]:
            raise ValueError(
                f"sycoca_shapes/{self.config.name} record {split}_{index}: its caption "
                f"{caption!r} is not what the generator makes ({example.captions[0]!r}); the "
                "data was built by other generator code: delete the build and regenerate it"
            )
        scene = example.scene
        tokens, spans = word_tokens(self.tokenizer, caption, self.max_text_len)
        words = caption.split()
        n = (self.image_size // self.patch_size) ** 2
        coverage = np.zeros((MAX_OBJECTS, n), np.float32)
        masks = shapes.object_masks(scene, self.image_size)
        coverage[: len(scene.shapes)] = shapes.patch_coverage(masks, self.patch_size)
        colour_tokens = np.zeros((MAX_OBJECTS, self.max_text_len), bool)
        kind_tokens = np.zeros((MAX_OBJECTS, self.max_text_len), bool)
        same_colour = np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool)
        same_kind = np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool)
        for i, shape in enumerate(scene.shapes):
            at = _phrase_start(words, [shape.size, shape.colour, shape.kind])
            colour_tokens[i, spans[at + 1]] = True
            kind_tokens[i, spans[at + 2]] = True
            for j, other in enumerate(scene.shapes):
                same_colour[i, j] = other.colour == shape.colour
                same_kind[i, j] = other.kind == shape.kind
        distractors = np.zeros((n,), np.float32)
        if example.clutter is not None and example.clutter.distractors:
            masks = clutter.distractor_masks(example.clutter, self.image_size)
            distractors = shapes.patch_coverage(masks, self.patch_size).max(0)
        return {
            **record,
            "tokens": tokens,
            "coverage": coverage,
            "distractor_coverage": distractors,
            "colour_tokens": colour_tokens,
            "kind_tokens": kind_tokens,
            "same_colour": same_colour,
            "same_kind": same_kind,
        }


def _phrase_start(words: list[str], phrase: list[str]) -> int:
    for start in range(len(words) - len(phrase) + 1):
        if words[start : start + len(phrase)] == phrase:
            return start
    raise ValueError(f"caption {' '.join(words)!r} does not name {' '.join(phrase)!r}")


def object_batches(context: common.EvalContext, eval_config: ml_collections.ConfigDict):
    """Host batches of images with ``ObjectTargets``' fields, ``mask`` and ``index``."""
    config, model = context.config, context.model
    data = config.data
    source = sources.open_source(
        eval_config.dataset, eval_config.split, data.data_dir, image_decoder=data.image_decoder
    )
    spec = sources.dataset_spec(eval_config.dataset)
    tokenizer = load_tokenizer(data.tokenizer, data.name)
    n, length = model.num_patches, model.max_text_len
    steps = [
        transforms.EvalImage(spec, model.image_size, data.min_image_size),
        ObjectTargets(
            eval_config.dataset, spec, tokenizer, length, model.image_size, model.patch_size
        ),
        transforms.SelectKeys(tuple(_placeholder(model.image_size, n, length))),
    ]
    index, count = pipeline.process_slice()
    batch_size = pipeline.per_process_batch_size(eval_config.batch_size, count)
    placeholder = _placeholder(model.image_size, n, length)
    return pipeline.padded_eval_batches(source, steps, placeholder, index, count, batch_size)


def _placeholder(image_size: int, n: int, length: int) -> dict[str, np.ndarray]:
    return {
        "image": np.zeros((image_size, image_size, 3), np.float32),
        "tokens": np.zeros((length + 1,), np.int32),
        "coverage": np.zeros((MAX_OBJECTS, n), np.float32),
        "distractor_coverage": np.zeros((n,), np.float32),
        "colour_tokens": np.zeros((MAX_OBJECTS, length), bool),
        "kind_tokens": np.zeros((MAX_OBJECTS, length), bool),
        "same_colour": np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool),
        "same_kind": np.zeros((MAX_OBJECTS, MAX_OBJECTS), bool),
    }


@functools.partial(jax.jit, static_argnums=(0, 2))
def _scores(model: SyCoCa, params: Any, score_mode: str, images: jax.Array, tokens: jax.Array):
    """(relevance (B, N), cos(patch, token) (B, N, T), cos(patch, caption embedding) (B, N),
    temperature (B,))."""
    out = model.apply({"params": params}, images, tokens, method=model.relevance_inputs)
    patches = l2_normalize(out["patch_embeddings"])
    similarity = jnp.einsum("bne,bte->bnt", patches, l2_normalize(out["token_embeddings"]))
    caption_similarity = jnp.einsum("bne,be->bn", patches, out["text_embedding"])
    relevance = masking.relevance_scores(
        out["patch_embeddings"],
        out["token_embeddings"],
        out["token_valid"],
        score_mode,
        out["temperature"],
    )
    # The temperature once per row, split over the batch like the rest: every process can
    # gather it (a replicated scalar is not addressable from one process of several).
    temperature = jax.lax.with_sharding_constraint(
        jnp.zeros_like(relevance[:, 0]) + out["temperature"], PartitionSpec(sharding.BATCH_AXES)
    )
    return relevance, similarity, caption_similarity, temperature


def _word_rows(sim, shape_on, word_tokens, same, present):
    """Rows per (image, shape) whose word is in the caption: the word's patch similarity (max
    over its pieces), whether it is real, the patches of the shapes sharing that colour/kind,
    and the patches of every described shape."""
    rows_sim, rows_valid, rows_target = [], [], []
    for i in range(MAX_OBJECTS):
        tok = word_tokens[:, i]  # (B, T)
        rows_sim.append(relevance_probes.masked_max(sim, tok[:, None, :], -1))  # (B, N)
        rows_valid.append(present[:, i] & tok.any(-1))
        rows_target.append(np.any(same[:, i, :, None] & shape_on, axis=1))  # (B, N)
    on_object = np.tile(shape_on.any(1), (MAX_OBJECTS, 1))
    return (
        np.concatenate(rows_sim),
        np.concatenate(rows_valid),
        np.concatenate(rows_target),
        on_object,
    )


def run(context: common.EvalContext, eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    model = context.model
    s = settings(eval_config)
    score_mode = s["score_mode"] or model.score_mode
    n = model.num_patches
    keep = masking.static_count(n, model.caption_keep_ratio, "caption_keep_ratio")
    masked = masking.static_count(n, model.tgmim_mask_ratio, "tgmim_mask_ratio")
    per_image: dict[str, list[np.ndarray]] = {}
    per_word: dict[str, list[np.ndarray]] = {}
    total = 0
    for host_batch in object_batches(context, eval_config):
        batch = common.to_device(host_batch, context.mesh, ["image", *TARGETS])
        scores = context.call(_scores, score_mode, batch["image"], batch["tokens"])
        relevance, sim, cls, temperatures = (common.gather(x) for x in scores)
        temperature = float(temperatures[0])
        # The targets of the whole global batch, on every process (rows match the scores').
        targets = {key: common.gather(batch[key]) for key in TARGETS}
        real = np.flatnonzero(targets["mask"])
        if not len(real):
            continue
        total += len(real)
        coverage = targets["coverage"][real]
        shape_on = grounding.object_patches(coverage, s["min_coverage"])  # (B, K, N)
        on_object = shape_on.any(1)
        relevance, sim, cls = relevance[real], sim[real], cls[real]
        tokens = targets["tokens"][real, :-1]
        valid = tokens != PAD_ID
        words = valid & (tokens != BOS_ID) & (tokens != EOS_ID)
        metrics = grounding.selection_metrics(relevance, on_object, keep, masked)
        on_distractor = grounding.object_patches(
            targets["distractor_coverage"][real], s["min_coverage"]
        )
        has_clutter = bool(on_distractor.any())
        if has_clutter:
            metrics["relevance_vs_distractor_auroc"] = grounding.per_image_auroc_between(
                relevance, on_object, on_distractor
            )
            metrics["distractor_patch_share"] = on_distractor.mean(-1)
        arrays = dict(sim=sim, cls=cls, valid=valid, words=words, temperature=temperature)
        for name, probe in relevance_probes.CHEAP.items():
            scores = probe(arrays)
            if has_clutter:
                metrics[f"probe_{name}_vs_distractor_auroc"] = grounding.per_image_auroc_between(
                    scores, on_object, on_distractor
                )
            metrics[f"probe_{name}_auroc"] = grounding.per_image_auroc(scores, on_object)
        if s["probes"]:
            costly = context.call(
                relevance_probes.costly, tuple(sorted(s["probes"])), batch["image"], batch["tokens"]
            )
            for name, scores in costly.items():
                scores = common.gather(scores)[real]
                metrics[f"probe_{name}_auroc"] = grounding.per_image_auroc(scores, on_object)
                chosen = grounding.top_k_mask(scores, keep)
                metrics[f"probe_{name}_keep_precision"] = grounding.precision(chosen, on_object)
        for key, value in metrics.items():
            per_image.setdefault(key, []).append(value)
        present = coverage.max(-1) > 0  # (B, K): the scene has shape k
        word_sim = relevance_probes.centred(sim, words) if score_mode == "centred_max_sim" else sim
        for kind, same in (("colour", "same_colour"), ("kind", "same_kind")):
            word_tokens = targets[f"{kind}_tokens"][real]
            rows = _word_rows(word_sim, shape_on, word_tokens, targets[same][real], present)
            for key, value in grounding.word_metrics(*rows).items():
                per_word.setdefault(f"{kind}_word_{key}", []).append(value)
        if eval_config.num_examples > 0 and total >= eval_config.num_examples:
            break
    if not total:
        raise ValueError(f"mechanism on {eval_config.dataset}[{eval_config.split}]: no examples")
    out: dict[str, Any] = {
        key: grounding.nanmean(np.concatenate(values)) for key, values in per_image.items()
    }
    for key, values in per_word.items():
        kind, _, metric = key.partition("_word_")
        random = metric.startswith("random_")
        name = f"{'random_' if random else ''}{kind}_word_{metric.removeprefix('random_')}"
        out[name] = grounding.nanmean(np.concatenate(values))
    out.update(
        random_relevance_auroc=0.5,
        score_mode=score_mode,
        caption_keep=keep,
        tgmim_masked=masked,
        num_examples=total,
    )
    return out
