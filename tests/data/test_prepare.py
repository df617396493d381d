"""The converter: local image-caption data -> ArrayRecord TFDS dataset, bad records counted."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import converter, pipeline, prepare, readers, sources, tokenizer
from sycoca_jax.data.tokenizer import BOS_ID


def _jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path, samples) -> None:
    """img2dataset layout: <key>.jpg, <key>.txt, <key>.json per sample, in order."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            _add(tar, f"{key}.jpg", image)
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps({"caption": caption, "status": "success"}).encode())


CAPTIONS = [
    "a dog on a beach",
    "two red apples",
    "a city at night",
    "a small boat",
    "snow on a mountain",
    "a cat asleep",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One shard: 6 good samples, one corrupt JPEG and one empty caption among them."""
    root = tmp_path_factory.mktemp("converter")
    shards = root / "shards"
    shards.mkdir()
    samples = [(f"{i:09d}", _jpeg(i), caption) for i, caption in enumerate(CAPTIONS)]
    corrupt = _jpeg(100)[:300]  # a JPEG cut short: its header parses, its pixels do not
    samples.insert(2, ("000000100", corrupt, "a broken picture"))
    samples.insert(5, ("000000101", _jpeg(101), "   \n"))
    _write_shard(shards / "00000.tar", samples)
    data_dir = str(root / "tfds")
    summary = converter.convert_local(
        {"train": str(shards)},
        name="toy_pairs",
        data_dir=data_dir,
        options=converter.ConversionOptions(num_workers=0),
    )
    return data_dir, summary


def test_tar_shard_keeps_exactly_the_good_records(converted):
    data_dir, summary = converted
    source = sources.open_source("toy_pairs", "train", data_dir)
    assert len(source) == len(CAPTIONS)
    captions = sorted(r["captions"][0].decode() for r in source)
    assert captions == sorted(CAPTIONS)
    for record in source:
        index = int(record["key"].decode().split("/")[1])
        assert record["image"] == _jpeg(index)  # stored byte for byte
    assert summary["written"] == 6
    assert summary["skipped"] == {"empty_caption": 1, "undecodable_image": 1}


def test_summary_file_next_to_the_data(converted):
    data_dir, summary = converted
    path = os.path.join(data_dir, "toy_pairs", "1.0.0", converter.SUMMARY_FILE)
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert on_disk["written"] == 6
    assert on_disk["skipped"] == {"empty_caption": 1, "undecodable_image": 1}
    assert on_disk["splits"]["train"]["written"] == 6


def test_converted_data_goes_through_the_training_pipeline(converted, tmp_path):
    data_dir, _ = converted
    tok = tokenizer.train_tokenizer(
        sources.dataset_texts("toy_pairs", data_dir=data_dir),
        vocab_size=80,
        model_type="bpe",
        character_coverage=1.0,
    )
    source = sources.open_source("toy_pairs", "train", data_dir)
    dataset = pipeline.train_dataset(
        source,
        spec=sources.dataset_spec("toy_pairs"),
        tokenizer=tok,
        image_size=32,
        max_text_len=12,
        global_batch_size=4,
        process_index=0,
        process_count=1,
        crop_scale=(0.5, 1.0),
    )
    batch = next(iter(dataset))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["tokens"].shape == (4, 13)
    assert (batch["tokens"][:, 0] == BOS_ID).all()
    assert {tok.decode(t) for t in batch["tokens"]} <= set(CAPTIONS)


def test_cli_refuses_to_overwrite(converted, tmp_path, capsys):
    data_dir, _ = converted
    with pytest.raises(FileExistsError, match="already exists"):
        prepare.main(
            [
                "local",
                f"--source={tmp_path}",
                "--name=toy_pairs",
                f"--data_dir={data_dir}",
                "--num_workers=0",
            ]
        )


def test_jsonl_and_csv_with_missing_and_small_images(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(_jpeg(i))
    (images / "tiny.png").write_bytes(_jpeg(9, size=(12, 12)))
    rows = [
        ("images/0.jpg", "first caption"),
        ("images/1.jpg", "second caption"),
        ("images/missing.jpg", "no image here"),
        ("images/tiny.png", "too small"),
        ("images/2.jpg", ""),
    ]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for image, caption in rows:
            f.write(json.dumps({"image": image, "caption": caption}) + "\n")
        f.write("{not json\n")
    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerow(["images/3.jpg", "a validation caption"])
        writer.writerow(["images/0.jpg", "another one"])
    data_dir = str(tmp_path / "tfds")
    prepare.main(
        [
            "local",
            f"--source={tmp_path / 'pairs.jsonl'}",
            f"--source=validation={tmp_path / 'val.csv'}",
            "--name=my_pairs",
            f"--data_dir={data_dir}",
            "--num_workers=2",
            "--min_image_size=32",
            "--image_key=image",
            "--caption_key=caption",
        ]
    )
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])  # the CLI prints the summary
    assert summary["splits"]["train"] == {
        "written": 2,
        "skipped": {
            "empty_caption": 1,
            "image_too_small": 1,
            "missing_image": 1,
            "unreadable_row": 1,
        },
    }
    assert summary["splits"]["validation"] == {"written": 2, "skipped": {}}
    assert summary["written"] == 4
    validation = sources.open_source("my_pairs", "validation", data_dir)
    assert sorted(r["captions"][0].decode() for r in validation) == [
        "a validation caption",
        "another one",
    ]


def test_csv_column_names(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg(1))
    with open(tmp_path / "pairs.tsv", "w", newline="") as f:
        f.write("filepath\ttitle\na.jpg\ta tab separated caption\n")
    samples = list(
        readers.iter_source(str(tmp_path / "pairs.tsv"), image_key="filepath", caption_key="title")
    )
    assert [(s.caption, s.image is not None) for s in samples] == [
        ("a tab separated caption", True)
    ]
    with pytest.raises(ValueError, match="--image_key/--caption_key"):
        list(readers.iter_source(str(tmp_path / "pairs.tsv")))


def test_webdataset_caption_from_json_and_truncated_shard(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _add(tar, "x/000.jpg", _jpeg(0))
        _add(tar, "x/000.json", json.dumps({"caption": "from json"}).encode())
        _add(tar, "x/001.png", _jpeg(1))
        _add(tar, "x/001.txt", b"from txt")
    samples = list(readers.iter_webdataset_shard(str(tmp_path / "a.tar")))
    assert [(s.key, s.caption) for s in samples] == [("x/000", "from json"), ("x/001", "from txt")]
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    problems = [s.problem for s in readers.iter_webdataset_shard(str(tmp_path / "b.tar"))]
    assert "unreadable_shard" in problems


def test_check_sample_reencodes_large_images():
    sample = readers.ImageText("k", _jpeg(3, size=(400, 200)), "caption")
    reason, record = converter.check_sample(sample, converter.ConversionOptions(max_image_side=100))
    assert reason is None
    assert Image.open(io.BytesIO(record["image"])).size == (100, 50)
