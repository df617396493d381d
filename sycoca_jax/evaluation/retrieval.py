"""Zero-shot image–text retrieval over a whole test set (CoCa §4.2.2): every image against
every caption by cosine similarity of the contrastive embeddings; R@1/5/10 both ways.

Similarities are computed in chunks of images (or captions) on device, so 5k images × 25k
captions never materialise as one matrix. On a subset of the split (``common.SUBSETS``, e.g. the
compositional test scenes) the subset's images and captions are the queries and the whole split
stays the gallery, so the subset's numbers compare with the whole split's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax.evaluation import common
from sycoca_jax.evaluation.settings import EvalSettings

KS = (1, 5, 10)


@jax.jit
def _image_to_text_ranks(
    images: jax.Array, texts: jax.Array, text_image: jax.Array, image_ids: jax.Array
) -> jax.Array:
    """Rank (0 = best) of each image's best-ranked own caption among all captions."""
    sim = images @ texts.T
    own = text_image[None, :] == image_ids[:, None]
    best_own = jnp.max(jnp.where(own, sim, -jnp.inf), axis=1)
    return jnp.sum(sim > best_own[:, None], axis=1)


@jax.jit
def _text_to_image_ranks(texts: jax.Array, images: jax.Array, text_image: jax.Array) -> jax.Array:
    """Rank (0 = best) of each caption's own image among all images."""
    sim = texts @ images.T
    own = jnp.take_along_axis(sim, text_image[:, None], axis=1)
    return jnp.sum(sim > own, axis=1)


def ranks(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_image: np.ndarray,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each image's best own caption (N,), rank of each caption's image (T,)), 0 =
    best, against the whole gallery; ``text_image[t]`` is the index of caption t's image and
    ties count in the query's favour."""
    images = jnp.asarray(image_embeddings, jnp.float32)
    texts = jnp.asarray(text_embeddings, jnp.float32)
    owners = np.asarray(text_image, np.int32)
    image_ids = np.arange(len(images), dtype=np.int32)
    i2t = [
        np.asarray(
            _image_to_text_ranks(
                images[start : start + chunk],
                texts,
                jnp.asarray(owners),
                image_ids[start : start + chunk],
            )
        )
        for start in range(0, len(images), chunk)
    ]
    t2i = [
        np.asarray(
            _text_to_image_ranks(
                texts[start : start + chunk], images, jnp.asarray(owners[start : start + chunk])
            )
        )
        for start in range(0, len(texts), chunk)
    ]
    return np.concatenate(i2t), np.concatenate(t2i)


def recall_metrics(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """R@K both ways from ranks, their means (SyCoCa's mTR/mIR) and the mean of all six
    (``rsum / 6``)."""
    out: dict[str, float] = {}
    for k in KS:
        out[f"image_to_text_r{k}"] = float(np.mean(i2t_ranks < k))
        out[f"text_to_image_r{k}"] = float(np.mean(t2i_ranks < k))
    out["image_to_text_mean_recall"] = float(np.mean([out[f"image_to_text_r{k}"] for k in KS]))
    out["text_to_image_mean_recall"] = float(np.mean([out[f"text_to_image_r{k}"] for k in KS]))
    out["mean_recall"] = (out["image_to_text_mean_recall"] + out["text_to_image_mean_recall"]) / 2
    return out


def rank_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_image: np.ndarray,
    chunk: int = 1024,
) -> dict[str, float]:
    """``recall_metrics`` of every image and caption (see ``ranks``)."""
    return recall_metrics(*ranks(image_embeddings, text_embeddings, text_image, chunk))


@dataclasses.dataclass(frozen=True)
class Settings(EvalSettings):
    """A ``retrieval`` entry: the common fields only."""


NEEDS = ("encode_images", "encode_texts")


def embed_split(
    context: common.EvalContext, settings: Settings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(image embeddings (N, E), caption embeddings (T, E), caption → image index (T,), the
    images' ``common.SUBSETS`` flags {flag: (N,) bool} where the records have them)."""
    images, texts, owners, flags = [], [], [], {}
    predictors, params = context.predictors, context.params
    with context.placement.context():
        for host_batch in common.batches(context, settings, "retrieval"):
            present = [flag for flag in common.SUBSETS if flag in host_batch]
            keys = ["image", "tokens", "caption_mask", "mask", *present]
            batch = common.to_device(host_batch, context.placement, keys)
            b, c, length = batch["tokens"].shape
            image = common.gather(predictors.encode_images(params, batch["image"]))
            tokens = batch["tokens"].reshape(b * c, length)
            text = common.gather(predictors.encode_texts(params, tokens)).reshape(b, c, -1)
            mask, caption_mask = common.gather(batch["mask"]), common.gather(batch["caption_mask"])
            batch_flags = {flag: common.gather(batch[flag]) for flag in present}
            for row in np.flatnonzero(mask):
                valid = np.flatnonzero(caption_mask[row])
                owners.extend([len(images)] * len(valid))
                texts.append(text[row, valid])
                images.append(image[row])
                for flag, values in batch_flags.items():
                    flags.setdefault(flag, []).append(bool(values[row]))
            if 0 < settings.num_examples <= len(images):
                break
    if not images:
        raise ValueError(f"retrieval on {settings.dataset}[{settings.split}]: no examples")
    subset_flags = {k: np.asarray(v, bool) for k, v in flags.items()}
    return np.stack(images), np.concatenate(texts), np.asarray(owners, np.int32), subset_flags


def run(context: common.EvalContext, settings: Settings) -> dict[str, Any]:
    """R@K over the split; on each subset (``common.SUBSETS``) the records mark, R@K of that
    subset's images and captions as queries against the whole split."""
    images, texts, owners, flags = embed_split(context, settings)
    i2t, t2i = ranks(images, texts, owners)
    metrics: dict[str, Any] = recall_metrics(i2t, t2i)
    metrics.update(
        num_images=len(images),
        num_captions=len(texts),
        chance_image_to_text_r1=float(np.bincount(owners).mean() / len(texts)),
        chance_text_to_image_r1=1.0 / len(images),
    )
    for subset, rows in common.subset_rows(flags).items():
        part = recall_metrics(i2t[rows], t2i[rows[owners]])
        part.update(num_images=int(rows.sum()), num_captions=int(rows[owners].sum()))
        metrics.update(common.prefixed(subset, part))
    return metrics
