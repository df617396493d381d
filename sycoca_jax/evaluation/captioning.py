"""Captioning evaluation: caption a split's images with the KV-cached decoder and score the
captions against the references (BLEU-1..4, CIDEr-D, METEOR and SPICE where they can run).

``Settings`` (one ``config.evals`` entry of kind ``captioning``):

- the fields of every evaluator (``settings.EvalSettings``: ``dataset``, ``split``, ``batch_size``
  (global), ``num_examples`` (-1 = the whole split), ...).
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

The model is reached through its ``caption`` predict function (``predict.Predictors``).
Captions are detokenised with the run's tokenizer (``config.data.tokenizer``, else the training
dataset's bundled one): the model's vocabulary is the one it was trained with, whatever dataset
is evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from sycoca_jax import decoding
from sycoca_jax.evaluation import caption_metrics, common
from sycoca_jax.evaluation.settings import EvalSettings


@dataclasses.dataclass(frozen=True)
class Settings(EvalSettings):
    """A ``captioning`` entry (module docstring)."""

    decode: str = "beam"  # greedy | beam | sample
    num_beams: int = 3
    length_penalty: float = 0.6
    early_stopping: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    max_len: int | None = None  # None: model.max_text_len
    min_len: int = 0
    print_examples: int = 5
    metrics: tuple[str, ...] = caption_metrics.METRICS
    tokenizer: str = "auto"  # auto | ptb | python

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode not in decoding.METHODS:
            raise ValueError(f"decode={self.decode!r}; choose from {decoding.METHODS}")
        unknown = sorted(set(self.metrics) - set(caption_metrics.METRICS))
        if unknown:
            raise ValueError(f"metrics {unknown} unknown; known {caption_metrics.METRICS}")
        if self.tokenizer not in caption_metrics.TOKENIZERS:
            raise ValueError(
                f"tokenizer={self.tokenizer!r}; choose from {caption_metrics.TOKENIZERS}"
            )
        if self.num_beams < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                "captioning needs num_beams >= 1, temperature > 0 and 0 < top_p <= 1; got "
                f"{self.num_beams}, {self.temperature}, {self.top_p}"
            )
        if self.top_k < 0 or self.min_len < 0 or (self.max_len is not None and self.max_len < 1):
            raise ValueError(
                "captioning needs top_k >= 0, min_len >= 0 and max_len >= 1 (or None); got "
                f"{self.top_k}, {self.min_len}, {self.max_len}"
            )


NEEDS = ("caption",)


def decode_settings(settings: Settings, max_text_len: int, num_tokens: int) -> tuple:
    """The ``decoding.generate`` keywords of ``settings`` as a sorted (hashable) tuple."""
    max_len = max_text_len if settings.max_len is None else settings.max_len
    if max_len > max_text_len:
        raise ValueError(
            f"captioning max_len={max_len} exceeds model.max_text_len={max_text_len}; lower it"
        )
    kwargs: dict[str, Any] = dict(
        method=settings.decode, max_len=max_len, min_len=settings.min_len, num_tokens=num_tokens
    )
    if settings.decode == "beam":
        kwargs.update(
            num_beams=settings.num_beams,
            length_penalty=settings.length_penalty,
            early_stopping=settings.early_stopping,
        )
    if settings.decode == "sample":
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    return tuple(sorted(kwargs.items()))


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


class Captioned(NamedTuple):
    """Captions of a split's real rows in dataset order, with what goes with them."""

    predictions: list[str]
    references: list[list[str]]
    flags: dict[str, np.ndarray]  # the ``common.SUBSETS`` flags the records have, (n,) bool
    rate: float | None  # captions/s after the first (compiling) batch; None with one batch


def caption_split(context: common.EvalContext, settings: Settings) -> Captioned:
    """Captions every real row of the split (up to ``num_examples``), gathered from every
    process back into dataset order."""
    config = context.config
    from sycoca_jax.data.tokenizer import load_tokenizer  # where used (configs import this)

    tokenizer = load_tokenizer(config.data.tokenizer, config.data.name)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{config.model.vocab_size}: the model was not trained with this tokenizer"
        )
    # Ids past the tokenizer's (vocabulary padding) cannot be decoded: never generate them.
    static = decode_settings(settings, config.model.max_text_len, tokenizer.vocab_size)
    seed = jax.random.key(settings.seed)
    limit = settings.num_examples
    max_batches = math.ceil(limit / settings.batch_size) if limit > 0 else None
    # (index in the split, caption, references, subset flags), sorted by that index once every
    # process's are gathered: the captions in dataset order, whatever the process layout.
    indexed: list[tuple[int, str, list[str], dict[str, bool]]] = []
    timed_rows, timed_seconds = 0, 0.0
    with context.placement.context():
        for index, host_batch in enumerate(common.batches(context, settings, "captioning")):
            if max_batches is not None and index >= max_batches:
                break
            references = host_batch.pop("captions")
            images = common.to_device(host_batch, context.placement, ["image"])["image"]
            start = time.perf_counter()
            rng = jax.random.fold_in(seed, index)
            local = _local_rows(context.predictors.caption(context.params, images, rng, static))
            if index:  # the first batch includes compiling
                timed_rows += images.shape[0]
                timed_seconds += time.perf_counter() - start
            present = [flag for flag in common.SUBSETS if flag in host_batch]
            for row in np.flatnonzero(host_batch["mask"]):
                valid = host_batch["caption_mask"][row]
                refs = [str(r) for r, ok in zip(references[row], valid, strict=True) if ok]
                flags = {flag: bool(host_batch[flag][row]) for flag in present}
                split_index = int(host_batch["index"][row])
                indexed.append((split_index, tokenizer.decode(local[row]), refs, flags))
    in_order = sorted(_all_processes(indexed), key=lambda item: item[0])
    if limit > 0:
        in_order = in_order[:limit]
    if not in_order:
        raise ValueError(f"captioning on {settings.dataset}[{settings.split}]: no examples")
    flags = {
        flag: np.asarray([item[3][flag] for item in in_order], bool) for flag in in_order[0][3]
    }
    return Captioned(
        [item[1] for item in in_order],
        [list(item[2]) for item in in_order],
        flags,
        timed_rows / timed_seconds if timed_seconds else None,
    )


def run(context: common.EvalContext, settings: Settings) -> dict[str, Any]:
    """Metrics (floats; ``"unavailable: ..."`` strings for metrics that cannot run), their chance
    levels (``chance_bleu_4``, ``chance_cider``: each caption against the next image's
    references), ``decode``, ``tokenizer``, ``num_images``, ``captions_per_sec`` (given more than
    one batch), ``examples`` (a list of dicts), and the metrics of each subset
    (``common.SUBSETS``) the records mark, scored on that subset alone."""
    captioned = caption_split(context, settings)
    predictions, references = captioned.predictions, captioned.references

    def score(rows: np.ndarray | None = None, metrics: tuple[str, ...] = settings.metrics):
        chosen = range(len(predictions)) if rows is None else np.flatnonzero(rows)
        return caption_metrics.score_captions(
            [predictions[i] for i in chosen],
            [references[i] for i in chosen],
            metrics=metrics,
            tokenizer=settings.tokenizer,
        )

    out: dict[str, Any] = score()
    if len(predictions) > 1:
        # Chance level: the same captions scored against another image's references.
        shifted = references[1:] + references[:1]
        chance = caption_metrics.score_captions(
            predictions, shifted, metrics=("bleu", "cider"), tokenizer=settings.tokenizer
        )
        out["chance_bleu_4"], out["chance_cider"] = chance["bleu_4"], chance["cider"]
    for subset, rows in common.subset_rows(captioned.flags).items():
        part = score(rows)
        part.pop("tokenizer")
        out.update(common.prefixed(subset, part))
    examples = [
        {"prediction": p, "references": r}
        for p, r in zip(predictions[: max(settings.print_examples, 0)], references, strict=False)
    ]
    for i, example in enumerate(examples):
        logging.info(
            "caption %d: %r  (reference: %r)", i, example["prediction"], example["references"][0]
        )
    for key, value in out.items():
        if isinstance(value, str) and value.startswith(caption_metrics.UNAVAILABLE):
            logging.info("caption metric %s %s", key, value)
    out["decode"] = settings.decode
    if captioned.rate is not None:
        out["captions_per_sec"] = captioned.rate
    out["examples"] = examples
    return out
