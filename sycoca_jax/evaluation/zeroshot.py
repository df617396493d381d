"""Zero-shot classification: class names × prompt templates → ensembled text embeddings, then
top-1/top-5 of every image against them (CLIP's protocol, which CoCa follows)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sycoca_jax.data import sources
from sycoca_jax.data.tokenizer import load_tokenizer
from sycoca_jax.evaluation import common, prompts
from sycoca_jax.models.layers import l2_normalize
from sycoca_jax.models.sycoca import SyCoCa


def class_names(dataset: str, data_dir: str | None) -> list[str]:
    """Readable class names: imagenet2012's WordNet ids become their first lemma."""
    if sources.base_name(dataset) == "imagenet2012":
        return prompts.readable_imagenet_names()
    return [name.replace("_", " ") for name in sources.class_names(dataset, data_dir)]


@functools.partial(jax.jit, static_argnums=0)
def _text_embeddings(model: SyCoCa, params: Any, tokens: jax.Array) -> jax.Array:
    return model.apply({"params": params}, tokens, method=model.encode_text)["embedding"]


@functools.partial(jax.jit, static_argnums=0)
def _image_logits(model: SyCoCa, params: Any, images: jax.Array, weights: jax.Array) -> jax.Array:
    embedding = model.apply({"params": params}, images, method=model.encode_image)["embedding"]
    return embedding @ weights.T


def classifier_weights(
    context: common.EvalContext, names: list[str], templates: tuple[str, ...], chunk: int = 256
) -> np.ndarray:
    """(classes, E): for each class the normalised mean of its normalised prompt embeddings."""
    config = context.config
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.name)
    texts = [p for name in names for p in prompts.prompts(name, templates)]
    tokens = tokenizer.tokenize_batch(texts, config.model.max_text_len)
    shards = context.mesh.shape["data"] * context.mesh.shape["fsdp"]
    chunk = max(shards, chunk // shards * shards)
    embeddings = []
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        padded = np.zeros((chunk, tokens.shape[1]), np.int32)
        padded[: len(part)] = part
        padded[len(part) :, 0] = 1  # bos-only rows, discarded below
        on_device = common.from_host_array(padded, context.mesh)
        embeddings.append(common.gather(context.call(_text_embeddings, on_device))[: len(part)])
    per_prompt = np.concatenate(embeddings).reshape(len(names), len(templates), -1)
    return np.asarray(l2_normalize(jnp.asarray(per_prompt.mean(axis=1))))


def run(context: common.EvalContext, eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    names = class_names(eval_config.dataset, context.config.data.data_dir)
    templates = prompts.TEMPLATE_SETS[eval_config.templates]
    weights = jnp.asarray(classifier_weights(context, names, templates))
    correct1 = correct5 = total = 0
    for host_batch in common.batches(context, eval_config, "classification"):
        batch = common.to_device(host_batch, context.mesh, ["image", "label", "mask"])
        logits = common.gather(context.call(_image_logits, batch["image"], weights))
        labels, mask = common.gather(batch["label"]), common.gather(batch["mask"])
        top5 = np.argsort(-logits, axis=1)[:, :5]
        correct1 += int(np.sum((top5[:, 0] == labels) & mask))
        correct5 += int(np.sum(np.any(top5 == labels[:, None], axis=1) & mask))
        total += int(mask.sum())
        if eval_config.num_examples > 0 and total >= eval_config.num_examples:
            break
    return {
        "top1": correct1 / max(total, 1),
        "top5": correct5 / max(total, 1),
        "chance_top1": 1.0 / len(names),
        "num_examples": total,
        "num_classes": len(names),
    }


def check(eval_config: ml_collections.ConfigDict) -> None:
    if eval_config.templates not in prompts.TEMPLATE_SETS:
        raise ValueError(
            f"zeroshot templates must be one of {sorted(prompts.TEMPLATE_SETS)}, "
            f"got {eval_config.templates!r}"
        )
