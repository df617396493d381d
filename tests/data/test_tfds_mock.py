"""coco_captions and cifar10 through the same pipelines, with ``tfds.testing.mock_data``.

The registered TFDS builders of these datasets import TensorFlow, so the pipeline opens prepared
datasets from their files (``builder_from_files``). The mock therefore needs each dataset's
metadata files; they are written here from the feature specs of TFDS's coco_captions (2014,
1.1.0, Karpathy splits) and cifar10 (3.0.2), and ``mock_data`` supplies random records.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sycoca_jax.data import pipeline, sources
from sycoca_jax.data.tokenizer import BOS_ID, bundled_model_path
from tests.helpers import tiny_config

KARPATHY_SPLITS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}

COCO_CAPTIONS_FEATURES = tfds.features.FeaturesDict(
    {
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence(
            {
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(num_classes=80),
                "is_crowd": np.bool_,
            }
        ),
        "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
    }
)

CIFAR10_FEATURES = tfds.features.FeaturesDict(
    {
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(
            names=[
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
        ),
    }
)


def _write_metadata(root, *, name, version, config, features, splits):
    """Writes a dataset's dataset_info.json/features.json under its real name; no data."""

    class Metadata(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {}

        def _generate_examples(self):
            yield from ()

    Metadata.name = name
    builder = Metadata(data_dir=root, file_format="array_record")
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir, dataset_name=name, filetype_suffix="array_record"
    )
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[n],
                    num_bytes=0,
                    filename_template=template.replace(split=split),
                )
                for split, n in splits.items()
            ]
        )
    )
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tfds_metadata"))
    _write_metadata(
        root,
        name="coco_captions",
        version="1.1.0",
        config="2014",
        features=COCO_CAPTIONS_FEATURES,
        splits=KARPATHY_SPLITS,
    )
    _write_metadata(
        root,
        name="cifar10",
        version="3.0.2",
        config=None,
        features=CIFAR10_FEATURES,
        splits={"train": 50_000, "test": 10_000},
    )
    return root


def _mock(metadata_dir, num_examples):
    return tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=metadata_dir
    )


def test_coco_captions_train_and_retrieval(metadata_dir, tmp_path):
    # Karpathy train = train + restval. The mock decodes images itself (image_decoder="tfds")
    # and makes them small, hence min_image_size=1; its captions are random ASCII, which the
    # shapes tokenizer can encode (and mock_data ignores data_dir).
    config = tiny_config(
        str(tmp_path),
        name="coco_captions",
        train_split="train+restval",
        eval_split="test",
        image_decoder="tfds",
        min_image_size=1,
        tokenizer=bundled_model_path(),
    )
    with _mock(metadata_dir, 24):
        source = sources.open_source(
            "coco_captions", "train+restval", "/unused", image_decoder="tfds"
        )
        assert len(source) == 24
        iterator = pipeline.make_train_iterator(config)
        batch = next(iterator)
        assert batch["image"].shape == (32, 64, 64, 3) and batch["image"].dtype == np.uint8
        assert batch["tokens"].shape == (32, 25) and (batch["tokens"][:, 0] == BOS_ID).all()
        assert iterator.stats.total_skipped == 0
        iterator.close()

        retrieval = pipeline.make_eval_dataset(config, "retrieval", batch_size=8)
        batches = list(retrieval)
        assert len(batches) == 3
        assert batches[0]["tokens"].shape == (8, 5, 25)
        assert np.concatenate([b["mask"] for b in batches]).all()
        assert batches[0]["caption_mask"].any(axis=1).all()

        with pytest.raises(ValueError, match="has no split"):
            sources.open_source("coco_captions", "validation", "/unused", image_decoder="tfds")


def test_cifar10_zero_shot_batches(metadata_dir, tmp_path):
    config = tiny_config(str(tmp_path), image_decoder="tfds")
    with _mock(metadata_dir, 10):
        assert sources.class_names("cifar10", "/unused")[:2] == ["airplane", "automobile"]
        dataset = pipeline.make_eval_dataset(
            config, "classification", name="cifar10", split="test", batch_size=4
        )
        batches = list(dataset)
    assert len(batches) == 3
    assert batches[0]["image"].shape == (4, 64, 64, 3)
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 10 and labels.dtype == np.int32
    assert ((labels[mask] >= 0) & (labels[mask] < 10)).all()
