"""The benchmark shards: img2dataset's layout, realistic sizes, deterministic, and convertible."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import converter, sources
from sycoca_jax.tools import benchmark_shards


def _members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_shards")
    summary = benchmark_shards.write_shards(str(root / "shards"), 5, seed=3, shard_size=3)
    return root, summary


def test_layout_sizes_and_captions(shards):
    root, summary = shards
    assert summary["images"] == 5 and summary["shards"] == 2
    first, second = _members(root / "shards" / "00000.tar"), _members(root / "shards" / "00001.tar")
    names = [name for name, _ in first + second]
    keys = ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
    for (_, jpeg), (_, text), (_, meta) in zip(*[iter(first + second)] * 3, strict=True):
        image = Image.open(io.BytesIO(jpeg))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert min(image.size) == 256 and max(image.size) <= 2 * 256
        assert 8 * 1024 < len(jpeg) < 40 * 1024  # CC3M-like at 256 px
        record = json.loads(meta)
        assert record["caption"] == text.decode() and record["status"] == "success"
        assert (record["width"], record["height"]) == image.size
        assert 10 <= len(text.decode().split()) <= 30
    # Not flat colour: a photograph's spread of values.
    assert np.asarray(Image.open(io.BytesIO(first[0][1]))).std() > 20


def test_same_seed_same_bytes_and_no_overwrite(shards, tmp_path):
    root, _ = shards
    benchmark_shards.write_shards(str(tmp_path / "again"), 5, seed=3, shard_size=3)
    assert (tmp_path / "again" / "00001.tar").read_bytes() == (
        root / "shards" / "00001.tar"
    ).read_bytes()
    other = benchmark_shards.samples(1, seed=4)
    assert next(other)[0] != _members(root / "shards" / "00000.tar")[0][1]
    with pytest.raises(FileExistsError, match="already holds"):
        benchmark_shards.write_shards(str(tmp_path / "again"), 1)


def test_the_converter_keeps_every_record(shards):
    root, _ = shards
    summary = converter.convert_local(
        {"train": str(root / "shards")},
        name="bench_toy",
        data_dir=str(root / "tfds"),
        options=converter.ConversionOptions(num_workers=0),
    )
    assert summary["written"] == 5 and not summary["skipped"]
    source = sources.open_source("bench_toy", "train", str(root / "tfds"))
    captions = {sources.dataset_spec("bench_toy").captions(source[i])[0] for i in range(5)}
    assert captions == {c for _, c, _, _ in benchmark_shards.samples(5, seed=3)}
