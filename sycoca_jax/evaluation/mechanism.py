"""Mechanism evaluation: does the text-guided relevance find the objects the caption describes?

Only for ``sycoca_shapes`` (plain or ``clutter``): its generator knows where every described
object is (``object_targets``). The model scores the patches against each image's first caption
as attentive masking does in training (the ``relevance_inputs`` predict function ->
``masking.relevance_scores``) and ``grounding`` turns scores and coverage into:

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

``Settings`` beyond the common fields: ``score_mode`` (None: the model's), ``min_coverage`` (a
patch lies on an object from this share of its pixels), ``probes`` (costly probes to add).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sycoca_jax import sharding
from sycoca_jax.evaluation import common, grounding, relevance_probes
from sycoca_jax.evaluation.settings import EvalSettings
from sycoca_jax.models import masking
from sycoca_jax.models.layers import l2_normalize

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # sycoca_jax.data.tokenizer's (the data stack loads lazily)


@dataclasses.dataclass(frozen=True)
class Settings(EvalSettings):
    """A ``mechanism`` entry (module docstring)."""

    score_mode: str | None = None  # None: the model's
    min_coverage: float = grounding.MIN_COVERAGE  # a patch lies on an object from this share
    probes: tuple[str, ...] = ()  # costlier scores to compare (relevance_probes.COSTLY)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset is not None:
            check_dataset(self.dataset)
        if self.score_mode is not None and self.score_mode not in masking.SCORE_MODES:
            raise ValueError(
                f"mechanism score_mode={self.score_mode!r}; choose from {masking.SCORE_MODES}"
            )
        unknown = sorted(set(self.probes) - set(relevance_probes.COSTLY))
        if unknown:
            raise ValueError(
                f"mechanism probes {unknown} unknown; known: {relevance_probes.COSTLY}"
            )
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"mechanism min_coverage must be in (0, 1], got {self.min_coverage}")


# The scores come from the model's relevance inputs; the costly probes need more (run checks).
NEEDS = ("relevance_inputs",)
PROBE_NEEDS = {
    "contrast": ("relevance_inputs",),
    "gradient": ("encode_images", "encode_texts"),
    "occlusion": ("encode_image_patches", "encode_texts"),
}


def check_dataset(dataset: str) -> None:
    """Fails on data without object positions (or a bad ``sycoca_shapes`` config name)."""
    from sycoca_jax.data import shapes_builder, sources  # where used: configs import this

    if sources.base_name(dataset) != "sycoca_shapes":
        raise ValueError(
            f"mechanism evaluation needs sycoca_shapes data (its generator knows where the "
            f"described objects are); got dataset {dataset!r}"
        )
    shapes_builder.config_from_name(dataset)  # a bad config name fails here


@functools.partial(jax.jit, static_argnums=1)
def _scores(inputs: dict[str, jax.Array], score_mode: str):
    """(relevance (B, N), cos(patch, token) (B, N, T), cos(patch, caption embedding) (B, N),
    temperature (B,)) from the ``relevance_inputs`` predict function's output."""
    patches = l2_normalize(inputs["patch_embeddings"])
    similarity = jnp.einsum("bne,bte->bnt", patches, l2_normalize(inputs["token_embeddings"]))
    caption_similarity = jnp.einsum("bne,be->bn", patches, inputs["text_embedding"])
    relevance = masking.relevance_scores(
        inputs["patch_embeddings"],
        inputs["token_embeddings"],
        inputs["token_valid"],
        score_mode,
        inputs["temperature"],
    )
    # The temperature once per row, split over the batch like the rest: every process can
    # gather it (a replicated scalar is not addressable from one process of several).
    temperature = jax.lax.with_sharding_constraint(
        jnp.zeros_like(relevance[:, 0]) + inputs["temperature"], PartitionSpec(sharding.BATCH_AXES)
    )
    return relevance, similarity, caption_similarity, temperature


def _word_rows(sim, shape_on, word_tokens, same, present):
    """Rows per (image, shape) whose word is in the caption: the word's patch similarity (max
    over its pieces), whether it is real, the patches of the shapes sharing that colour/kind,
    and the patches of every described shape."""
    rows_sim, rows_valid, rows_target = [], [], []
    count = word_tokens.shape[1]  # shapes per scene (object_targets.MAX_OBJECTS)
    for i in range(count):
        tok = word_tokens[:, i]  # (B, T)
        rows_sim.append(relevance_probes.masked_max(sim, tok[:, None, :], -1))  # (B, N)
        rows_valid.append(present[:, i] & tok.any(-1))
        rows_target.append(np.any(same[:, i, :, None] & shape_on, axis=1))  # (B, N)
    on_object = np.tile(shape_on.any(1), (count, 1))
    return (
        np.concatenate(rows_sim),
        np.concatenate(rows_valid),
        np.concatenate(rows_target),
        on_object,
    )


def _check_probes(context: common.EvalContext, settings: Settings) -> None:
    available = context.predictors.available()
    for probe in settings.probes:
        lacking = [need for need in PROBE_NEEDS[probe] if need not in available]
        if lacking:
            raise ValueError(
                f"mechanism probe {probe!r} needs the predict function(s) {lacking}, which this "
                "model lacks; drop it from the entry's probes"
            )


class _Selection(NamedTuple):
    score_mode: str
    keep: int  # patches the captioner keeps
    masked: int  # patches TG-MIM hides
    min_coverage: float


def _image_metrics(
    targets: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    temperature: float,
    selection: _Selection,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(per-image metrics, per-word metrics) of the real rows of one batch: ``targets`` from
    ``object_targets``, ``scores`` the model's ``relevance``, ``sim``, ``cls`` and the costly
    probes' scores."""
    keep, min_coverage = selection.keep, selection.min_coverage
    coverage = targets["coverage"]
    shape_on = grounding.object_patches(coverage, min_coverage)  # (B, K, N)
    on_object = shape_on.any(1)
    relevance, sim = scores["relevance"], scores["sim"]
    tokens = targets["tokens"][:, :-1]
    valid = tokens != PAD_ID
    words = valid & (tokens != BOS_ID) & (tokens != EOS_ID)
    metrics = grounding.selection_metrics(relevance, on_object, keep, selection.masked)
    on_distractor = grounding.object_patches(targets["distractor_coverage"], min_coverage)
    has_clutter = bool(on_distractor.any())
    if has_clutter:
        metrics["relevance_vs_distractor_auroc"] = grounding.per_image_auroc_between(
            relevance, on_object, on_distractor
        )
        metrics["distractor_patch_share"] = on_distractor.mean(-1)
    arrays = dict(sim=sim, cls=scores["cls"], valid=valid, words=words, temperature=temperature)
    for name, probe in relevance_probes.CHEAP.items():
        probed = probe(arrays)
        if has_clutter:
            metrics[f"probe_{name}_vs_distractor_auroc"] = grounding.per_image_auroc_between(
                probed, on_object, on_distractor
            )
        metrics[f"probe_{name}_auroc"] = grounding.per_image_auroc(probed, on_object)
    for name in relevance_probes.COSTLY:
        if name in scores:
            metrics[f"probe_{name}_auroc"] = grounding.per_image_auroc(scores[name], on_object)
            chosen = grounding.top_k_mask(scores[name], keep)
            metrics[f"probe_{name}_keep_precision"] = grounding.precision(chosen, on_object)
    per_word = {}
    present = coverage.max(-1) > 0  # (B, K): the scene has shape k
    centred = selection.score_mode == "centred_max_sim"
    word_sim = relevance_probes.centred(sim, words) if centred else sim
    for kind, same in (("colour", "same_colour"), ("kind", "same_kind")):
        rows = _word_rows(word_sim, shape_on, targets[f"{kind}_tokens"], targets[same], present)
        for key, value in grounding.word_metrics(*rows).items():
            per_word[f"{kind}_word_{key}"] = value
    return metrics, per_word


def run(context: common.EvalContext, settings: Settings) -> dict[str, Any]:
    """The metrics of the module docstring over ``settings.dataset``/``split``."""
    from sycoca_jax.evaluation import object_targets  # the data stack, where used
    from sycoca_jax.models import build  # the model's geometry and masking ratios

    _check_probes(context, settings)
    model = build.from_config(context.config.model)
    n = model.num_patches
    selection = _Selection(
        score_mode=settings.score_mode or model.score_mode,
        keep=masking.static_count(n, model.caption_keep_ratio, "caption_keep_ratio"),
        masked=masking.static_count(n, model.tgmim_mask_ratio, "tgmim_mask_ratio"),
        min_coverage=settings.min_coverage,
    )
    predictors, params = context.predictors, context.params
    probes = tuple(sorted(settings.probes))
    per_image: dict[str, list[np.ndarray]] = {}
    per_word: dict[str, list[np.ndarray]] = {}
    total = 0
    batches = object_targets.object_batches(
        context.config, settings, model.image_size, model.patch_size, model.max_text_len
    )
    keys = ["image", *object_targets.TARGETS]
    with context.placement.context():
        for host_batch in batches:
            batch = common.to_device(host_batch, context.placement, keys)
            images, tokens = batch["image"], batch["tokens"]
            inputs = predictors.relevance_inputs(params, images, tokens)
            relevance, sim, cls, temperatures = _scores(inputs, selection.score_mode)
            scores = dict(relevance=relevance, sim=sim, cls=cls)
            if probes:
                scores.update(
                    relevance_probes.costly(
                        predictors, params, probes, images, tokens, model.patch_size
                    )
                )
            # The whole global batch on every process (the targets' rows match the scores').
            targets = {key: common.gather(batch[key]) for key in object_targets.TARGETS}
            real = np.flatnonzero(targets["mask"])
            if not len(real):
                continue
            total += len(real)
            scores = {key: common.gather(value)[real] for key, value in scores.items()}
            temperature = float(common.gather(temperatures)[0])
            targets = {key: value[real] for key, value in targets.items()}
            image_metrics, word_metrics = _image_metrics(targets, scores, temperature, selection)
            for key, value in image_metrics.items():
                per_image.setdefault(key, []).append(value)
            for key, value in word_metrics.items():
                per_word.setdefault(key, []).append(value)
            if settings.num_examples > 0 and total >= settings.num_examples:
                break
    if not total:
        raise ValueError(f"mechanism on {settings.dataset}[{settings.split}]: no examples")
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
        score_mode=selection.score_mode,
        caption_keep=selection.keep,
        tgmim_masked=selection.masked,
        num_examples=total,
    )
    return out
