"""The converter keeps every good record: each kind of bad record is skipped and counted (never
aborts the conversion), odd image modes are stored as the RGB they mean, and a split with nothing
usable still leaves its summary and fails in one line."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import converter, prepare, sources
from tests.data import image_fixtures as fx

GREY16 = np.full((40, 40), 32896, np.uint16)  # 128 in 8 bit (convert("RGB") gives 255)
INKS = [(255, 0, 0, 0), (0, 0, 0, 0)]  # red and black through the test profile
LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8
OPTIONS = converter.ConversionOptions(min_image_size=16, max_image_pixels=50_000, num_workers=0)


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return fx.encode(Image.fromarray(pixels), "JPEG")


def _tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _shard_members():
    """(tar members, captions that must be written, skip counts that must be reported)."""
    cmyk = fx.encode(fx.cmyk_patches(INKS), "JPEG", quality=100, icc_profile=fx.cmyk_profile())
    members = [
        ("good0.jpg", _jpeg(0)),
        ("good0.txt", b"a good picture"),
        ("a.jpg", _jpeg(1)),
        ("a.txt", b"the first a"),
        ("good1.jpg", _jpeg(2)),
        ("good1.txt", b"another good one"),
        ("a.jpg", _jpeg(3)),  # key "a" again, further on
        ("a.txt", b"the second a"),
        ("b.jpg", _jpeg(4)),
        ("b.txt", b"the first b"),
        ("b.jpg", _jpeg(5)),  # key "b" again, right after
        ("b.txt", b"the second b"),
        ("number.jpg", _jpeg(6)),
        ("number.json", json.dumps({"caption": 5}).encode()),
        ("list.jpg", _jpeg(7)),
        ("list.json", json.dumps({"caption": ["x", "y"]}).encode()),
        ("latin.jpg", _jpeg(8)),
        ("latin.txt", b"a " + LATIN1),
        ("bomb.jpg", _jpeg(9, size=(300, 200))),  # 60,000 px > max_image_pixels
        ("bomb.txt", b"too many pixels"),
        ("grey16.png", fx.encode(Image.fromarray(GREY16), "PNG")),
        ("grey16.txt", b"a sixteen bit grey"),
        ("cmyk.jpg", cmyk),
        ("cmyk.json", json.dumps({"caption": "a cmyk photo"}).encode()),
    ]
    written = {
        "a good picture",
        "the first a",
        "another good one",
        "the first b",
        "a sixteen bit grey",
        "a cmyk photo",
    }
    skipped = {"bad_caption_type": 2, "duplicate_key": 2, "image_too_large": 1}
    skipped["undecodable_text"] = 1
    return members, written, skipped


def _tables(root):
    """A CSV saved with a byte-order mark and a JSONL, each with a Latin-1 byte in one row."""
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(_jpeg(10 + i))
    csv = b"\xef\xbb\xbfimage,caption\n0.jpg,a csv caption\n1.jpg,a " + LATIN1 + b"\n"
    (root / "pairs.csv").write_bytes(csv + b"2.jpg,a last csv caption\n")
    rows = [
        json.dumps({"image": "0.jpg", "caption": "a jsonl caption"}).encode(),
        b'{"image": "1.jpg", "caption": "' + LATIN1 + b'"}',
        json.dumps({"image": "2.jpg", "caption": 7}).encode(),
        json.dumps({"image": "3.jpg", "caption": ["a", "list"]}).encode(),
        json.dumps({"image": "3.jpg", "caption": "a last jsonl caption"}).encode(),
    ]
    (root / "pairs.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    return {
        "validation": ({"a csv caption", "a last csv caption"}, {"undecodable_text": 1}),
        "test": (
            {"a jsonl caption", "a last jsonl caption"},
            {"bad_caption_type": 2, "undecodable_text": 1},
        ),
    }


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    (root / "shards").mkdir()
    members, written, skipped = _shard_members()
    _tar(root / "shards" / "00000.tar", members)
    expected = {"train": (written, skipped), **_tables(root)}
    data_dir = str(root / "tfds")
    split_sources = {
        "train": str(root / "shards"),
        "validation": str(root / "pairs.csv"),
        "test": str(root / "pairs.jsonl"),
    }
    summary = converter.convert_local(
        split_sources, name="mixed", data_dir=data_dir, options=OPTIONS
    )
    return summary, expected, data_dir


def test_every_good_record_is_written_and_every_bad_one_counted(mixed):
    summary, expected, data_dir = mixed
    for split, (captions, skipped) in expected.items():
        assert summary["splits"][split] == {"written": len(captions), "skipped": skipped}, split
        source = sources.open_source("mixed", split, data_dir)
        assert sorted(r["captions"][0].decode() for r in source) == sorted(captions), split
    train = sources.open_source("mixed", "train", data_dir)
    firsts = {r["captions"][0].decode(): r["key"].decode() for r in train}
    assert firsts["the first a"].endswith("/a") and firsts["the first b"].endswith("/b")
    on_disk = json.loads(
        (sources.load_builder("mixed", data_dir).data_path / "conversion_summary.json").read_text()
    )
    assert on_disk == summary


@pytest.mark.parametrize("decoder", ["pil", "tfds"])
def test_odd_modes_are_stored_as_the_rgb_they_mean(mixed, decoder):
    """A 16-bit PNG and a CMYK JPEG with a profile read back as 3-channel RGB of the right
    colour, whichever decoder reads them (TFDS alone gave white / 4 channels before)."""
    _, _, data_dir = mixed
    records = {
        r["captions"][0].decode(): r
        for r in sources.open_source("mixed", "train", data_dir, image_decoder=decoder)
    }
    pixels = {}
    for caption in ("a sixteen bit grey", "a cmyk photo"):
        image = records[caption]["image"]
        if decoder == "pil":
            image = np.asarray(Image.open(io.BytesIO(image)))
        assert image.shape[-1] == 3 and image.dtype == np.uint8, caption
        pixels[caption] = image
    np.testing.assert_allclose(pixels["a sixteen bit grey"], 128, atol=2)
    centres = fx.patch_centres(pixels["a cmyk photo"], len(INKS))
    np.testing.assert_allclose(centres, [(255, 0, 0), (0, 0, 0)], atol=12)  # plain: cyan, white


@pytest.mark.parametrize(
    "name,members,reason",
    [
        ("dup", [("k.jpg", 0), ("k.txt", b"1"), ("k.jpg", 1), ("k.txt", b"2")], "duplicate_key"),
        (
            "far",
            [("k.jpg", 0), ("k.txt", b"1"), ("j.jpg", 2), ("j.txt", b"j"), ("k.jpg", 1)]
            + [("k.txt", b"2")],
            "duplicate_key",
        ),  # fmt: skip
        ("number", [("k.jpg", 0), ("k.json", b'{"caption": 3}')], "bad_caption_type"),
        ("listed", [("k.jpg", 0), ("k.json", b'{"caption": ["a"]}')], "bad_caption_type"),
        ("latin", [("k.jpg", 0), ("k.txt", LATIN1)], "undecodable_text"),
    ],
)
def test_one_bad_record_beside_good_ones(tmp_path, name, members, reason):
    """Each bad kind alone among good records: the good ones are written, the bad one counted
    (before: the conversion aborted, or wrote a duplicate's second half or a mangled caption)."""
    good = [("good.jpg", _jpeg(0)), ("good.txt", b"the good one")]
    data = [(n, _jpeg(v) if isinstance(v, int) else v) for n, v in members]
    _tar(tmp_path / "00000.tar", good + data)
    summary = converter.convert_local(
        {"train": str(tmp_path)}, name=name, data_dir=str(tmp_path / "tfds"), options=OPTIONS
    )
    keys = {n.split(".")[0] for n, _ in good + members}
    assert summary["written"] == len(keys) - (reason != "duplicate_key")
    assert summary["skipped"] == {reason: 1}
    if reason == "duplicate_key":  # the first k is the one kept
        source = sources.open_source(name, "train", str(tmp_path / "tfds"))
        assert {r["captions"][0] for r in source if r["key"].endswith(b"/k")} == {b"1"}


def test_bom_csv_and_latin1_rows(tmp_path):
    expected = _tables(tmp_path)
    for split, source in (("validation", "pairs.csv"), ("test", "pairs.jsonl")):
        summary = converter.convert_local(
            {split: str(tmp_path / source)},
            name=f"table_{split}",
            data_dir=str(tmp_path / "tfds"),
            options=OPTIONS,
        )
        captions, skipped = expected[split]
        assert summary["splits"][split] == {"written": len(captions), "skipped": skipped}


def test_a_split_with_nothing_usable_keeps_its_summary_and_fails_in_one_line(
    tmp_path, monkeypatch, capsys
):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", [("a.jpg", b"not a jpeg"), ("a.txt", b"x"), ("b.jpg", _jpeg(1))])
    data_dir = tmp_path / "tfds"
    argv = ["prepare", "local", f"--source={shards}", "--name=broken", f"--data_dir={data_dir}"]
    monkeypatch.setattr(sys, "argv", [*argv, "--num_workers=0"])
    with pytest.raises(SystemExit) as exit_:
        prepare.run()
    message = str(exit_.value.code)
    assert "\n" not in message and "split 'train' has no usable record" in message
    assert "undecodable_image" in message and "empty_caption" in message
    summary_file = data_dir / "broken" / "1.0.0" / converter.SUMMARY_FILE
    assert json.loads(summary_file.read_text())["splits"]["train"] == {
        "written": 0,
        "skipped": {"empty_caption": 1, "undecodable_image": 1},
    }
    # The same name builds once the input is fixed; the failed run's summary is replaced.
    _tar(shards / "00000.tar", [("a.jpg", _jpeg(0)), ("a.txt", b"x")])
    summary = converter.convert_local(
        {"train": str(shards)}, name="broken", data_dir=str(data_dir), options=OPTIONS
    )
    assert summary["written"] == 1
    assert json.loads(summary_file.read_text()) == summary
