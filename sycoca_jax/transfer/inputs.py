"""Data plumbing shared by the transfer tasks: sources, the tokenizer, training iterators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections

from sycoca_jax.data import sources
from sycoca_jax.data.skipping import SkipCountingIterator
from sycoca_jax.data.tokenizer import Tokenizer, load_tokenizer
from sycoca_jax.transfer import towers


def open_split(config: ml_collections.ConfigDict, split: str) -> Sequence[Any]:
    data = config.data
    return sources.open_source(data.name, split, data.data_dir, image_decoder=data.image_decoder)


def spec(config: ml_collections.ConfigDict) -> sources.DatasetSpec:
    return sources.dataset_spec(config.data.name)


def tokenizer_for(config: ml_collections.ConfigDict, pretrained: towers.Pretrained) -> Tokenizer:
    """``config.data.tokenizer``, else the pretraining run's (its own or its dataset's bundled
    one): the text towers only know the ids they were trained on."""
    path = config.data.tokenizer or pretrained.config.data.get("tokenizer")
    tokenizer = load_tokenizer(path, pretrained.config.data.name)
    if tokenizer.vocab_size > pretrained.model.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the pretrained model "
            f"has vocab_size {pretrained.model.vocab_size}: it is not the pretraining tokenizer"
        )
    return tokenizer


def train_iterator(
    dataset: grain.IterDataset, config: ml_collections.ConfigDict
) -> SkipCountingIterator:
    """Host batches without the skip counts; stops when too many records are bad."""
    data = config.data
    return SkipCountingIterator(
        iter(dataset),
        max_skipped_fraction=data.max_skipped_fraction,
        dataset_name=f"{data.name}[{data.train_split}]",
    )


def loader_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The training-pipeline keyword arguments every task shares."""
    data = config.data
    return dict(
        seed=data.shuffle_seed,
        crop_scale=tuple(data.crop_scale),
        min_image_size=data.min_image_size,
        num_workers=data.num_workers,
        prefetch=data.prefetch,
        buffer_size=data.prefetch_buffer_size,
    )


def eval_threads(config: ml_collections.ConfigDict) -> int:
    """Threads preparing evaluation batches (at least 2: decoding is the bottleneck on CPUs)."""
    return max(2, config.data.num_workers)
