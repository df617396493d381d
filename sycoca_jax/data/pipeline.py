"""Input pipelines: TFDS data source -> grain -> host-local numpy batches -> global jax.Arrays.

Training (``train_dataset`` / ``make_train_iterator``)::

  source -> global stream (per-epoch shuffle, from the seed) -> this process's rows of each global
  batch -> decode + random-resized crop + normalise -> one caption per image per epoch ->
  tokenise -> bad records replaced and counted -> batch -> thread or process prefetch

The stream is a function of the config (``stream``): every random choice for an example comes from
(seed, epoch, record), and process ``p`` of ``P`` reads rows ``[p*b, (p+1)*b)`` of global batch
``s`` (positions ``s*B ...``), so any process layout sees the same global batches and a saved
position resumes on any process count. Batches are ``{"image": (b, H, W, 3) f32, "tokens": (b,
L+1) i32}`` with ``b = global_batch_size // process_count``; the iterator's ``stats`` hold the
skip counts.

Evaluation (``eval_dataset`` / ``make_eval_dataset``): no shuffle, no repeat, resize + centre crop,
every record kept. Each process gets the same number of batches; the last ones are padded and
``mask`` (b,) marks real examples (bad records are masked too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from sycoca_jax import sharding
from sycoca_jax.data import sources, stream, transforms
from sycoca_jax.data.skipping import SkipCountingIterator
from sycoca_jax.data.tokenizer import Tokenizer, load_tokenizer

EVAL_TASKS = ("retrieval", "captioning", "classification", "validation")


def process_slice(
    process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int]:
    """``(index, count)`` of this process; ``jax.process_index()/process_count()`` by default."""
    count = jax.process_count() if process_count is None else int(process_count)
    index = jax.process_index() if process_index is None else int(process_index)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad process slice: index {index} of {count} processes")
    return index, count


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """The host batch size; the global batch must split evenly over the processes."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"the global batch size {global_batch_size} does not divide evenly over "
            f"{process_count} processes; set config.batch_size to a multiple of {process_count}"
        )
    return global_batch_size // process_count


def augmented_batches(
    source: Sequence[Any],
    record_steps: Sequence[grain.transforms.Map | grain.transforms.RandomMap],
    keys: Sequence[str],
    *,
    spec: sources.DatasetSpec,
    image_size: int,
    global_batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    min_image_size: int = 1,
    num_epochs: int | None = None,
    num_workers: int = 0,
    prefetch: str = "thread",
    buffer_size: int = 2,
) -> stream.TrainStream:
    """Training batches of augmented images plus what ``record_steps`` add (``keys``): this
    process's rows of the global stream (``stream``: per-epoch shuffle, bad records replaced and
    counted, every random choice drawn from (seed, epoch, record)), ``num_epochs=None``: forever.

    The batches depend on the config alone: not on the process layout, ``num_workers`` or
    ``prefetch``.
    """
    index, count = process_slice(process_index, process_count)
    per_process_batch_size(global_batch_size, count)  # checks that it divides
    steps = [
        transforms.TrainImage(spec, image_size, crop_scale, min_image_size),
        *record_steps,
        transforms.SelectKeys(("image", *keys)),
    ]
    return stream.TrainStream(
        source,
        steps,
        seed=seed,
        layout=stream.Layout(global_batch_size, index, count),
        num_epochs=num_epochs,
        reading=stream.Reading(num_workers, prefetch, buffer_size),
    )


def train_dataset(
    source: Sequence[Any],
    *,
    spec: sources.DatasetSpec,
    tokenizer: Tokenizer,
    max_text_len: int,
    **options: Any,
) -> stream.TrainStream:
    """The pretraining pipeline (module docstring): one caption sampled per image per epoch,
    tokenised; ``options`` as in ``augmented_batches``."""
    steps = [transforms.SampleCaption(spec), transforms.TokenizeCaption(tokenizer, max_text_len)]
    return augmented_batches(source, steps, ("tokens",), spec=spec, **options)


def eval_dataset(
    source: Sequence[Any],
    *,
    task: str,
    spec: sources.DatasetSpec,
    image_size: int,
    global_batch_size: int,
    tokenizer: Tokenizer | None = None,
    max_text_len: int | None = None,
    num_captions: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    min_image_size: int = 1,
    subsets: Sequence[str] = (),
) -> grain.MapDataset:
    """Batches for evaluation; ``len()`` is the number of batches (equal on every process).

    task ``retrieval``: ``image``, ``tokens`` (b, C, L+1) with every caption, ``caption_mask``
    (b, C); ``captioning``: ``image``, ``captions`` (b, C) object array of reference texts (pop
    it before ``make_global_batch``), ``caption_mask``; ``classification``: ``image``,
    ``label`` (b,) i32; ``validation``: ``image``, ``tokens`` (b, L+1) from the first caption.
    All of them have ``mask`` (b,) bool, False for padding and bad records, and ``index`` (b,)
    i32, each row's position in the split (-1 for padding); and each boolean record feature named
    in ``subsets`` (e.g. ``compositional``) as (b,) bool, False for padding.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")
    index, count = process_slice(process_index, process_count)
    batch_size = per_process_batch_size(global_batch_size, count)
    steps: list[grain.transforms.Map] = [transforms.EvalImage(spec, image_size, min_image_size)]
    placeholder: dict[str, np.ndarray] = {"image": np.zeros((image_size, image_size, 3), np.uint8)}
    if task in ("retrieval", "validation"):
        if tokenizer is None or max_text_len is None:
            raise ValueError(f"task {task!r} needs a tokenizer and max_text_len")
    if task == "retrieval":
        num_captions = num_captions or spec.num_captions
        steps.append(transforms.TokenizeAllCaptions(spec, tokenizer, max_text_len, num_captions))
        placeholder["tokens"] = np.zeros((num_captions, max_text_len + 1), np.int32)
        placeholder["caption_mask"] = np.zeros((num_captions,), bool)
    elif task == "captioning":
        num_captions = num_captions or spec.num_captions
        steps.append(transforms.CaptionTexts(spec, num_captions))
        placeholder["captions"] = np.full((num_captions,), "", dtype=object)
        placeholder["caption_mask"] = np.zeros((num_captions,), bool)
    elif task == "validation":
        steps += [
            transforms.FirstCaption(spec),
            transforms.TokenizeCaption(tokenizer, max_text_len),
        ]
        placeholder["tokens"] = np.zeros((max_text_len + 1,), np.int32)
    else:
        steps.append(transforms.Label(spec))
        placeholder["label"] = np.int32(0)
    placeholder.update({key: np.bool_(False) for key in subsets})
    steps.append(transforms.SelectKeys(tuple(placeholder)))

    return padded_eval_batches(source, steps, placeholder, index, count, batch_size)


def padded_eval_batches(
    source: Sequence[Any],
    steps: Sequence[grain.transforms.Map],
    placeholder: dict[str, Any],
    process_index: int,
    process_count: int,
    batch_size: int,
) -> grain.MapDataset:
    """This process's slice through ``steps``, bad records replaced by ``placeholder``, padded
    with it to the same number of batches on every process; ``mask`` marks real rows and
    ``index`` their positions in ``source``."""
    dataset = grain.MapDataset.source(source)[process_index::process_count]
    for step in steps:
        dataset = dataset.map(step)
    dataset = dataset.map(transforms.MaskSkipped(placeholder))
    dataset = dataset.map_with_index(transforms.SplitIndex(process_index, process_count))
    num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
    padding = num_batches * batch_size - len(dataset)
    if padding:
        pad = {**placeholder, "mask": np.bool_(False), "index": np.int32(-1)}
        dataset = grain.MapDataset.concatenate([dataset, grain.MapDataset.source([pad] * padding)])
    return dataset.batch(batch_size)


# ---------------------------------------------------------------------------------------------
# From a config (configs/sycoca.py: config.data, config.model, config.batch_size).


def _tokenizer_for(config: ml_collections.ConfigDict) -> Tokenizer:
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.name)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but "
            f"config.model.vocab_size is {config.model.vocab_size}; raise the model's vocab_size "
            "or use a smaller tokenizer"
        )
    return tokenizer


def num_train_examples(config: ml_collections.ConfigDict) -> int:
    """Records in ``config.data.train_split`` (bad ones included): turns epochs into steps."""
    data = config.data
    return len(
        sources.open_source(
            data.name, data.train_split, data.data_dir, image_decoder=data.image_decoder
        )
    )


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence[Any] | None = None,
) -> SkipCountingIterator:
    """The training iterator of ``config``: ``next()`` gives a host batch, ``.stats`` the skip
    counts (``.stats.metrics()`` for logging), ``get_state()/set_state()`` checkpoint it.

    ``source`` replaces ``open_source(config.data.name, config.data.train_split, ...)``.
    """
    data = config.data
    if source is None:
        source = sources.open_source(
            data.name, data.train_split, data.data_dir, image_decoder=data.image_decoder
        )
    dataset = train_dataset(
        source,
        spec=sources.dataset_spec(data.name),
        tokenizer=_tokenizer_for(config),
        image_size=config.model.image_size,
        max_text_len=config.model.max_text_len,
        global_batch_size=config.batch_size,
        seed=data.shuffle_seed,
        process_index=process_index,
        process_count=process_count,
        crop_scale=tuple(data.crop_scale),
        min_image_size=data.min_image_size,
        num_workers=data.num_workers,
        prefetch=data.prefetch,
        buffer_size=data.prefetch_buffer_size,
    )
    return SkipCountingIterator(
        iter(dataset),
        max_skipped_fraction=data.max_skipped_fraction,
        dataset_name=f"{data.name}[{data.train_split}]",
    )


def make_eval_dataset(
    config: ml_collections.ConfigDict,
    task: str,
    *,
    name: str | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Sequence[Any] | None = None,
    subsets: Sequence[str] = (),
) -> grain.MapDataset:
    """Evaluation batches of ``name`` (default ``config.data.name``) ``split`` (default
    ``config.data.eval_split``), preprocessed as ``config`` says; see ``eval_dataset``. Of the
    boolean features ``subsets``, those the records have are carried into the batches."""
    data = config.data
    name = name or data.name
    split = split or data.eval_split
    if source is None:
        if not split:
            raise ValueError(
                f"no evaluation split given and config.data.eval_split is unset for {name!r}"
            )
        source = sources.open_source(name, split, data.data_dir, image_decoder=data.image_decoder)
    needs_text = task in ("retrieval", "validation")
    present = [key for key in subsets if len(source) and key in source[0]]
    return eval_dataset(
        source,
        task=task,
        spec=sources.dataset_spec(name),
        image_size=config.model.image_size,
        global_batch_size=batch_size or config.batch_size,
        tokenizer=_tokenizer_for(config) if needs_text else None,
        max_text_len=config.model.max_text_len if needs_text else None,
        process_index=process_index,
        process_count=process_count,
        min_image_size=data.min_image_size,
        subsets=present,
    )


# ---------------------------------------------------------------------------------------------
# Host batches -> global arrays.


def make_global_batch(
    host_batch: dict[str, np.ndarray], placement: sharding.Placement | Mesh
) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global ``jax.Array``s split on the batch axis over the
    placement's (or mesh's) ``data × fsdp`` devices (``jax.make_array_from_process_local_data``)."""
    mesh = placement.mesh if isinstance(placement, sharding.Placement) else placement
    target = sharding.batch_sharding(mesh)
    shards = sharding.batch_shards(mesh)
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(
                f"batch entry {key!r} is a scalar; only per-example arrays can be "
                "sharded on the batch axis"
            )
        global_size = value.shape[0] * jax.process_count()
        if global_size % shards:
            raise ValueError(
                f"global batch {global_size} (entry {key!r}) does not divide over the "
                f"{shards} devices of mesh axes {sharding.BATCH_AXES}; choose config.batch_size "
                f"as a multiple of {shards}"
            )
        out[key] = jax.make_array_from_process_local_data(target, value)
    return out
