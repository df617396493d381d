"""Captioning evaluation: caption a split's images with the KV-cached decoder and score the
captions against the references (BLEU-1..4, CIDEr-D, METEOR and SPICE where they can run).

``eval_config`` fields (one ``config.evals`` entry of kind ``captioning``; a missing field takes
its value from ``DEFAULTS``):

- ``dataset``, ``split``, ``batch_size`` (global), ``num_examples`` (-1 = the whole split): as
  for every evaluator.
- ``decode``: ``greedy`` | ``beam`` | ``sample``.
- ``num_beams``, ``length_penalty``, ``early_stopping``: beam search (``score = log_prob /
  length ** penalty``; ``early_stopping`` True stops an image at ``num_beams`` finished captions,
  False searches on while an alive one could still score better; see ``sycoca_jax.decoding``).
- ``temperature``, ``top_k`` (0 = off), ``top_p`` (1.0 = off), ``seed``: sampling.
- ``max_len``: most generated tokens (None = ``model.max_text_len``, the most the cache holds);
  ``min_len``: eos is banned before that many tokens.
- ``print_examples``: how many (prediction, references) pairs are logged and returned under
  ``examples``.
- ``metrics``: a subset of ``caption_metrics.METRICS``; ``tokenizer``: ``auto`` (PTBTokenizer
  when Java is present, else the Python rendition) | ``ptb`` | ``python``.

Captions are detokenised with the run's tokenizer (``config.data.tokenizer``, else the training
dataset's bundled one): the model's vocabulary is the one it was trained with, whatever dataset
is evaluated.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sycoca_jax import decoding
from sycoca_jax.data.tokenizer import load_tokenizer
from sycoca_jax.evaluation import caption_metrics, common
from sycoca_jax.models.sycoca import SyCoCa

DEFAULTS: dict[str, Any] = dict(
    decode="beam",
    num_beams=3,
    length_penalty=0.6,
    early_stopping=True,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    max_len=None,
    min_len=0,
    num_examples=-1,
    print_examples=5,
    metrics=caption_metrics.METRICS,
    tokenizer="auto",
)


def settings(eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The evaluator's fields of ``eval_config``, defaults filled in."""
    out = dict(DEFAULTS)
    for key in DEFAULTS:
        value = eval_config.get(key, None)
        if value is not None:
            out[key] = value
    out["metrics"] = tuple(out["metrics"])
    return out


def check(eval_config: ml_collections.ConfigDict) -> None:
    """Fails on bad fields before anything is compiled (the registry calls this)."""
    s = settings(eval_config)
    if s["decode"] not in decoding.METHODS:
        raise ValueError(f"captioning decode={s['decode']!r}; choose from {decoding.METHODS}")
    unknown = sorted(set(s["metrics"]) - set(caption_metrics.METRICS))
    if unknown:
        raise ValueError(f"captioning metrics {unknown} unknown; known {caption_metrics.METRICS}")
    if s["tokenizer"] not in caption_metrics.TOKENIZERS:
        raise ValueError(
            f"captioning tokenizer={s['tokenizer']!r}; choose from {caption_metrics.TOKENIZERS}"
        )
    if s["num_beams"] < 1 or s["temperature"] <= 0 or not 0 < s["top_p"] <= 1 or s["top_k"] < 0:
        raise ValueError(
            "captioning needs num_beams >= 1, temperature > 0, 0 < top_p <= 1 and top_k >= 0; "
            f"got {s['num_beams']}, {s['temperature']}, {s['top_p']}, {s['top_k']}"
        )


def _decode_kwargs(s: dict[str, Any], max_text_len: int) -> dict[str, Any]:
    max_len = max_text_len if s["max_len"] is None else int(s["max_len"])
    if max_len > max_text_len:
        raise ValueError(
            f"captioning max_len={max_len} exceeds model.max_text_len={max_text_len}; lower it"
        )
    kwargs = dict(method=s["decode"], max_len=max_len, min_len=int(s["min_len"]))
    if s["decode"] == "beam":
        kwargs.update(
            num_beams=int(s["num_beams"]),
            length_penalty=float(s["length_penalty"]),
            early_stopping=bool(s["early_stopping"]),
        )
    if s["decode"] == "sample":
        kwargs.update(
            temperature=float(s["temperature"]), top_k=int(s["top_k"]), top_p=float(s["top_p"])
        )
    return kwargs


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in host-batch order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([shards[start] for start in sorted(shards)])


def _all_processes(items: list) -> list:
    """``items`` of every process, concatenated in process order (JSON over an allgather)."""
    if jax.process_count() == 1:
        return items
    data = np.frombuffer(json.dumps(items).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    out: list = []
    for p, size in enumerate(sizes):
        out.extend(json.loads(bytes(gathered[p, :size]).decode()))
    return out


@functools.partial(jax.jit, static_argnums=(0, 2))
def _caption(
    model: SyCoCa,
    params: Any,
    settings: tuple[tuple[str, Any], ...],
    images: jax.Array,
    rng: jax.Array,
) -> jax.Array:
    """Caption tokens of a batch; ``settings`` (sorted decode kwargs) are static."""
    kwargs = dict(settings)
    rng = rng if kwargs["method"] == "sample" else None
    return decoding.caption_images(model, params, images, rng=rng, **kwargs).tokens


def caption_split(
    context: common.EvalContext, eval_config: ml_collections.ConfigDict
) -> tuple[list[str], list[list[str]], float | None]:
    """(predicted captions, their references, captions/s of the decoder after the first,
    compiling, batch (None with one batch)) over the real rows of the split, in dataset order."""
    model = context.model
    if not model.use_captioning:
        raise ValueError(
            "captioning evaluation needs a model with a captioning head (model.use_captioning="
            "True); the clip objective has none: drop this entry from config.evals"
        )
    s = settings(eval_config)
    kwargs = _decode_kwargs(s, model.max_text_len)
    tokenizer = load_tokenizer(context.config.data.tokenizer, context.config.data.name)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model.vocab_size}: the model was not trained with this tokenizer"
        )
    kwargs["num_tokens"] = tokenizer.vocab_size  # ids past it (vocabulary padding) cannot decode

    static = tuple(sorted(kwargs.items()))
    seed = jax.random.key(int(s["seed"]))
    limit = int(s["num_examples"])
    max_batches = math.ceil(limit / eval_config.batch_size) if limit > 0 else None
    # (index in the split, caption, references), sorted by that index once every process's are
    # gathered: the captions in dataset order, whatever the process layout.
    indexed: list[tuple[int, str, list[str]]] = []
    timed_rows, timed_seconds = 0, 0.0
    for index, host_batch in enumerate(common.batches(context, eval_config, "captioning")):
        if max_batches is not None and index >= max_batches:
            break
        references = host_batch.pop("captions")
        images = common.to_device(host_batch, context.mesh, ["image"])["image"]
        start = time.perf_counter()
        tokens = context.call(_caption, static, images, jax.random.fold_in(seed, index))
        local = _local_rows(tokens)
        if index:  # the first batch includes compiling
            timed_rows += images.shape[0]
            timed_seconds += time.perf_counter() - start
        for row in np.flatnonzero(host_batch["mask"]):
            valid = host_batch["caption_mask"][row]
            refs = [str(r) for r, ok in zip(references[row], valid, strict=True) if ok]
            split_index = int(host_batch["index"][row])
            indexed.append((split_index, tokenizer.decode(local[row]), refs))
    in_order = sorted(_all_processes(indexed), key=lambda item: item[0])
    pairs = [(caption, refs) for _, caption, refs in in_order]
    if limit > 0:
        pairs = pairs[:limit]
    if not pairs:
        raise ValueError(f"captioning on {eval_config.dataset}[{eval_config.split}]: no examples")
    rate = timed_rows / timed_seconds if timed_seconds else None
    return [p for p, _ in pairs], [list(r) for _, r in pairs], rate


def run(context: common.EvalContext, eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Metrics (floats; ``"unavailable: ..."`` strings for metrics that cannot run), their chance
    levels (``chance_bleu_4``, ``chance_cider``: each caption against the next image's
    references), ``decode``, ``tokenizer``, ``num_images``, ``captions_per_sec`` (given more than
    one batch) and ``examples`` (a list of dicts)."""
    s = settings(eval_config)
    predictions, references, rate = caption_split(context, eval_config)
    metrics: dict[str, Any] = caption_metrics.score_captions(
        predictions, references, metrics=s["metrics"], tokenizer=s["tokenizer"]
    )
    if len(predictions) > 1:
        # Chance level: the same captions scored against another image's references.
        shifted = references[1:] + references[:1]
        chance = caption_metrics.score_captions(
            predictions, shifted, metrics=("bleu", "cider"), tokenizer=s["tokenizer"]
        )
        metrics["chance_bleu_4"], metrics["chance_cider"] = chance["bleu_4"], chance["cider"]
    examples = [
        {"prediction": p, "references": r}
        for p, r in zip(predictions[: max(s["print_examples"], 0)], references, strict=False)
    ]
    for i, example in enumerate(examples):
        logging.info(
            "caption %d: %r  (reference: %r)", i, example["prediction"], example["references"][0]
        )
    for key, value in metrics.items():
        if isinstance(value, str) and value.startswith(caption_metrics.UNAVAILABLE):
            logging.info("caption metric %s %s", key, value)
    metrics["decode"] = s["decode"]
    if rate is not None:
        metrics["captions_per_sec"] = rate
    metrics["examples"] = examples
    return metrics
