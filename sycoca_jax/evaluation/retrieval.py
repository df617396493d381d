"""Zero-shot image–text retrieval over a whole test set (CoCa §4.2.2): every image against
every caption by cosine similarity of the contrastive embeddings; R@1/5/10 both ways.

Similarities are computed in chunks of images (or captions) on device, so 5k images × 25k
captions never materialise as one matrix.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sycoca_jax.evaluation import common
from sycoca_jax.models.sycoca import SyCoCa

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


def rank_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_image: np.ndarray,
    chunk: int = 1024,
) -> dict[str, float]:
    """R@K both ways, their means (SyCoCa's mTR/mIR) and the mean of all six (``rsum / 6``).

    ``text_image[t]`` is the index of caption t's image; ties count in the caption's favour.
    """
    images = jnp.asarray(image_embeddings, jnp.float32)
    texts = jnp.asarray(text_embeddings, jnp.float32)
    owners = np.asarray(text_image, np.int32)
    image_ids = np.arange(len(images), dtype=np.int32)
    i2t = []
    for start in range(0, len(images), chunk):
        i2t.append(
            np.asarray(
                _image_to_text_ranks(
                    images[start : start + chunk],
                    texts,
                    jnp.asarray(owners),
                    image_ids[start : start + chunk],
                )
            )
        )
    t2i = []
    for start in range(0, len(texts), chunk):
        t2i.append(
            np.asarray(
                _text_to_image_ranks(
                    texts[start : start + chunk], images, jnp.asarray(owners[start : start + chunk])
                )
            )
        )
    i2t_ranks, t2i_ranks = np.concatenate(i2t), np.concatenate(t2i)
    out: dict[str, float] = {}
    for k in KS:
        out[f"image_to_text_r{k}"] = float(np.mean(i2t_ranks < k))
        out[f"text_to_image_r{k}"] = float(np.mean(t2i_ranks < k))
    out["image_to_text_mean_recall"] = float(np.mean([out[f"image_to_text_r{k}"] for k in KS]))
    out["text_to_image_mean_recall"] = float(np.mean([out[f"text_to_image_r{k}"] for k in KS]))
    out["mean_recall"] = (out["image_to_text_mean_recall"] + out["text_to_image_mean_recall"]) / 2
    return out


@functools.partial(jax.jit, static_argnums=0)
def _embed(model: SyCoCa, params: Any, images: jax.Array, tokens: jax.Array):
    """Image embeddings (b, E) and caption embeddings (b, C, E) of a retrieval batch."""
    b, c, length = tokens.shape
    image = model.apply({"params": params}, images, method=model.encode_image)["embedding"]
    text = model.apply({"params": params}, tokens.reshape(b * c, length), method=model.encode_text)
    return image, text["embedding"].reshape(b, c, -1)


def embed_split(
    context: common.EvalContext, eval_config: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image embeddings (N, E), caption embeddings (T, E), caption → image index (T,))."""
    images, texts, owners = [], [], []
    for host_batch in common.batches(context, eval_config, "retrieval"):
        keys = ["image", "tokens", "caption_mask", "mask"]
        batch = common.to_device(host_batch, context.mesh, keys)
        embedded = context.call(_embed, batch["image"], batch["tokens"])
        image, text = (common.gather(x) for x in embedded)
        mask, caption_mask = common.gather(batch["mask"]), common.gather(batch["caption_mask"])
        for row in np.flatnonzero(mask):
            valid = np.flatnonzero(caption_mask[row])
            owners.extend([len(images)] * len(valid))
            texts.append(text[row, valid])
            images.append(image[row])
        if eval_config.num_examples > 0 and len(images) >= eval_config.num_examples:
            break
    if not images:
        raise ValueError(f"retrieval on {eval_config.dataset}[{eval_config.split}]: no examples")
    return np.stack(images), np.concatenate(texts), np.asarray(owners, np.int32)


def run(context: common.EvalContext, eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    images, texts, owners = embed_split(context, eval_config)
    metrics = rank_metrics(images, texts, owners)
    metrics.update(
        num_images=len(images),
        num_captions=len(texts),
        chance_image_to_text_r1=float(np.bincount(owners).mean() / len(texts)),
        chance_text_to_image_r1=1.0 / len(images),
    )
    return metrics
