"""Zero-shot classification: class names × prompt templates → ensembled text embeddings, then
top-1/top-5 of every image against them (CLIP's protocol, which CoCa follows)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax import sharding
from sycoca_jax.evaluation import common, prompts
from sycoca_jax.evaluation.settings import EvalSettings
from sycoca_jax.models.layers import l2_normalize


def class_names(dataset: str, data_dir: str | None) -> list[str]:
    """Readable class names: imagenet2012's WordNet ids become their first lemma."""
    from sycoca_jax.data import sources  # the data stack is imported where used (not by configs)

    if sources.base_name(dataset) == "imagenet2012":
        return prompts.readable_imagenet_names()
    return [name.replace("_", " ") for name in sources.class_names(dataset, data_dir)]


@dataclasses.dataclass(frozen=True)
class Settings(EvalSettings):
    """A ``zeroshot`` entry: the common fields and the prompt set (``prompts.TEMPLATE_SETS``)."""

    templates: str = "clip_imagenet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.templates not in prompts.TEMPLATE_SETS:
            raise ValueError(
                f"templates={self.templates!r}; choose from {sorted(prompts.TEMPLATE_SETS)}"
            )


NEEDS = ("encode_images", "encode_texts")


@jax.jit
def _logits(embeddings: jax.Array, weights: jax.Array) -> jax.Array:
    return embeddings @ weights.T


def classifier_weights(
    context: common.EvalContext, names: list[str], templates: tuple[str, ...], chunk: int = 256
) -> np.ndarray:
    """(classes, E): for each class the normalised mean of its normalised prompt embeddings."""
    config = context.config
    from sycoca_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer, config.data.name)
    texts = [p for name in names for p in prompts.prompts(name, templates)]
    tokens = tokenizer.tokenize_batch(texts, config.model.max_text_len)
    shards = sharding.batch_shards(context.placement.mesh)
    chunk = max(shards, chunk // shards * shards)
    embeddings = []
    with context.placement.context():
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            padded = np.zeros((chunk, tokens.shape[1]), np.int32)
            padded[: len(part)] = part
            padded[len(part) :, 0] = 1  # bos-only rows, discarded below
            on_device = common.from_host_array(padded, context.placement)
            embedded = context.predictors.encode_texts(context.params, on_device)
            embeddings.append(common.gather(embedded)[: len(part)])
    per_prompt = np.concatenate(embeddings).reshape(len(names), len(templates), -1)
    return np.asarray(l2_normalize(jnp.asarray(per_prompt.mean(axis=1))))


def accuracy(top5: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Top-1/top-5 accuracy of predicted class rankings (n, >=5) against labels (n,)."""
    total = len(labels)
    return {
        "top1": float(np.sum(top5[:, 0] == labels)) / max(total, 1),
        "top5": float(np.sum(np.any(top5 == labels[:, None], axis=1))) / max(total, 1),
        "num_examples": total,
    }


def run(context: common.EvalContext, settings: Settings) -> dict[str, Any]:
    """Top-1/5 over the split, and on each subset (``common.SUBSETS``) the records mark."""
    names = class_names(settings.dataset, context.config.data.data_dir)
    templates = prompts.TEMPLATE_SETS[settings.templates]
    weights = jnp.asarray(classifier_weights(context, names, templates))
    top5s, labels, flags = [], [], {}
    with context.placement.context():
        for host_batch in common.batches(context, settings, "classification"):
            present = [flag for flag in common.SUBSETS if flag in host_batch]
            keys = ["image", "label", "mask", *present]
            batch = common.to_device(host_batch, context.placement, keys)
            embeddings = context.predictors.encode_images(context.params, batch["image"])
            logits = common.gather(_logits(embeddings, weights))
            rows = common.gather(batch["mask"]).astype(bool)
            top5s.append(np.argsort(-logits, axis=1)[rows, :5])
            labels.append(common.gather(batch["label"])[rows])
            for flag in present:
                flags.setdefault(flag, []).append(common.gather(batch[flag])[rows])
            if 0 < settings.num_examples <= sum(len(x) for x in labels):
                break
    top5, label = np.concatenate(top5s), np.concatenate(labels)
    out = accuracy(top5, label)
    out.update(chance_top1=1.0 / len(names), num_classes=len(names))
    flag_rows = {k: np.concatenate(v) for k, v in flags.items()}
    for subset, rows in common.subset_rows(flag_rows).items():
        out.update(common.prefixed(subset, accuracy(top5[rows], label[rows])))
    return out
