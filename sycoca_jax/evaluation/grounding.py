"""Does attentive masking pick the caption's objects? Pure NumPy metrics over patch scores and
the patches that described objects cover, each with the value random selection would get.

Inputs per image: ``scores`` (N,) relevance of each patch to the caption, ``on_object`` (N,)
whether a patch lies on a described object (``object_patches``). Selection follows the model
(``sycoca_jax.models.masking``): the captioner keeps the ``k`` highest-scoring patches, TG-MIM
hides the ``m`` highest-scoring ones, ties to the lower patch index.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

# A patch counts as lying on an object from this share of its pixels on: anti-aliased edges
# leave slivers of a percent or two in neighbouring patches, which are not the object.
MIN_COVERAGE = 0.1


def object_patches(coverage: np.ndarray, min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """(..., N) share of each patch on an object -> (..., N) bool."""
    return np.asarray(coverage) >= min_coverage


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N) -> (B, N) bool, True at each row's ``k`` highest scores (ties: lower index first,
    as ``jax.lax.top_k``)."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def precision(selected: np.ndarray, on_object: np.ndarray) -> np.ndarray:
    """(B,) share of each image's selected patches that lie on an object (NaN: none selected)."""
    selected, on_object = np.asarray(selected, bool), np.asarray(on_object, bool)
    count = selected.sum(-1)
    hits = (selected & on_object).sum(-1)
    return np.where(count > 0, hits / np.maximum(count, 1), np.nan)


def recall(selected: np.ndarray, on_object: np.ndarray) -> np.ndarray:
    """(B,) share of each image's object patches that are selected (NaN: no object patch)."""
    return precision(on_object, selected)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` from the rest: the
    probability that a random positive outscores a random negative, ties counting half
    (Mann-Whitney U / (n_pos * n_neg)). NaN when either class is empty."""
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores, method="average")  # ties share their mean rank
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def per_image_auroc(scores: np.ndarray, on_object: np.ndarray) -> np.ndarray:
    """(B,) AUROC within each image (NaN where an image has only one kind of patch)."""
    return np.array([auroc(s, o) for s, o in zip(scores, on_object, strict=True)])


def per_image_auroc_between(
    scores: np.ndarray, positive: np.ndarray, negative: np.ndarray
) -> np.ndarray:
    """(B,) AUROC of ``positive`` against ``negative`` patches only (the rest left out; a patch
    in both counts as positive), e.g. described objects against caption-unrelated ones."""
    positive, negative = np.asarray(positive, bool), np.asarray(negative, bool)
    out = []
    for s, pos, neg in zip(scores, positive, negative, strict=True):
        keep = pos | neg
        out.append(auroc(s[keep], pos[keep]))
    return np.array(out)


def argmax_hits(similarity: np.ndarray, on_target: np.ndarray) -> np.ndarray:
    """(B, N) similarity of each patch to a word, (B, N) bool target -> (B,) whether the most
    similar patch (lowest index on ties) lies on the target."""
    best = np.argmax(np.asarray(similarity), axis=-1)
    return np.take_along_axis(np.asarray(on_target, bool), best[:, None], axis=-1)[:, 0]


def selection_metrics(
    scores: np.ndarray, on_object: np.ndarray, keep: int, masked: int
) -> dict[str, np.ndarray]:
    """Per image (B,): what the captioner's ``keep`` and TG-MIM's ``masked`` selections hit, the
    AUROC of the scores, and what uniformly random selection gets in expectation.

    - ``caption_keep_precision``: share of kept patches on an object; random: the object share.
    - ``tgmim_mask_recall``: share of object patches hidden; random: ``masked / N``.
    - ``relevance_auroc``: object vs other patches; random: 0.5.
    """
    on_object = np.asarray(on_object, bool)
    n = on_object.shape[-1]
    has_object = on_object.any(-1)
    object_share = on_object.mean(-1)
    return {
        "caption_keep_precision": precision(top_k_mask(scores, keep), on_object),
        "random_caption_keep_precision": object_share,
        "tgmim_mask_recall": np.where(
            has_object, recall(top_k_mask(scores, masked), on_object), np.nan
        ),
        "random_tgmim_mask_recall": np.where(has_object, masked / n, np.nan),
        "relevance_auroc": per_image_auroc(scores, on_object),
        "object_patch_share": object_share,
    }


def word_metrics(
    similarity: np.ndarray, word_valid: np.ndarray, on_target: np.ndarray, on_object: np.ndarray
) -> dict[str, np.ndarray]:
    """Per word occurrence: ``similarity`` (W, N) of each patch to the word, ``word_valid`` (W,)
    which rows are real, ``on_target`` (W, N) the patches of the objects the word names,
    ``on_object`` (W, N) the patches of every described object.

    - ``hit``: the most similar patch lies on a named object; ``random_hit``: their patch share.
    - ``object_hit``: it lies on some described object (finding objects at all);
      ``random_object_hit``: the object patch share.
    - ``hit_given_object``: among words whose best patch is on an object, on the named one
      (telling objects apart; NaN where it is on none); ``random_hit_given_object``: the named
      objects' share of the object patches.
    """
    valid = np.asarray(word_valid, bool)
    on_target, on_object = np.asarray(on_target, bool), np.asarray(on_object, bool)
    hit = argmax_hits(similarity, on_target)[valid].astype(np.float64)
    object_hit = argmax_hits(similarity, on_object)[valid].astype(np.float64)
    target_share = on_target.mean(-1)[valid]
    object_share = on_object.mean(-1)[valid]
    return {
        "hit": hit,
        "random_hit": target_share,
        "object_hit": object_hit,
        "random_object_hit": object_share,
        "hit_given_object": np.where(object_hit > 0, hit, np.nan),
        "random_hit_given_object": target_share / np.maximum(object_share, 1e-12),
    }


def nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries (NaN when there are none)."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
