"""Image and caption transforms: crop geometry, decoding, normalisation, bad-record handling."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import images, sources, transforms
from sycoca_jax.data.skipping import BadRecord, SkippedRecord
from sycoca_jax.data.tokenizer import load_tokenizer

SPEC = sources.DatasetSpec(label_key="label", num_captions=3)


def _encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    return np.broadcast_to(
        np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], -1), (height, width, 3)
    ).astype(np.uint8)


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for width, height in [(640, 480), (300, 900), (64, 64)]:
        for _ in range(200):
            left, top, right, bottom = images.random_resized_crop_box(
                width, height, rng, scale=(0.3, 1.0)
            )
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            area = (right - left) * (bottom - top) / (width * height)
            aspect = (right - left) / (bottom - top)
            assert area <= 1.0 + 1e-9
            if area >= 0.3 - 0.05:  # a sampled crop (the fallback may be larger)
                assert 3 / 4 - 0.05 <= aspect <= 4 / 3 + 0.05 or area > 0.99


def test_full_scale_crop_is_the_whole_square_image():
    rng = np.random.default_rng(0)
    assert images.random_resized_crop_box(64, 64, rng, scale=(1.0, 1.0)) == (0, 0, 64, 64)
    # A 2:1 image with scale 1 falls back to the largest centred crop within 4:3.
    assert images.random_resized_crop_box(200, 100, rng, scale=(1.0, 1.0)) == (
        33,
        0,
        166,
        100,
    )  # width round(100 * 4 / 3) = 133


def test_centre_crop_box():
    assert images.centre_crop_box(200, 100) == (50, 0, 150, 100)
    assert images.centre_crop_box(90, 120) == (0, 15, 90, 105)


def test_crop_and_resize_matches_with_and_without_jpeg_draft():
    array = _gradient(800, 600)
    box = (100, 50, 700, 550)
    drafted = images.crop_and_resize(images.open_image(_encode(array)), box, 64)
    reference = images.crop_and_resize(images.open_image(_encode(array, "PNG")), box, 64)
    assert drafted.shape == (64, 64, 3) and drafted.dtype == np.uint8
    assert np.abs(drafted.astype(int) - reference.astype(int)).mean() < 4


def test_decoded_arrays_and_other_modes_become_rgb():
    grey = np.full((40, 50, 1), 200, np.uint8)
    out = images.crop_and_resize(images.open_image(grey), (0, 0, 50, 40), 16)
    assert out.shape == (16, 16, 3) and (out == 200).all()
    rgba = _encode(np.dstack([_gradient(30, 30), np.full((30, 30), 255, np.uint8)]), "PNG")
    assert images.crop_and_resize(images.open_image(rgba), (0, 0, 30, 30), 8).shape == (
        8,
        8,
        3,
    )


def test_bad_images_raise_bad_record():
    with pytest.raises(BadRecord) as error:
        images.open_image(b"definitely not an image")
    assert error.value.reason == "undecodable_image"
    with pytest.raises(BadRecord) as error:
        images.open_image(_encode(_gradient(20, 10)), min_image_size=16)
    assert error.value.reason == "image_too_small"
    truncated = _encode(_gradient(300, 300))[:2000]
    image = images.open_image(truncated)  # the header is fine ...
    with pytest.raises(BadRecord) as error:  # ... the pixels are not
        images.crop_and_resize(image, (0, 0, 300, 300), 32)
    assert error.value.reason == "undecodable_image"


def test_train_and_eval_image_transforms():
    record = {"image": _encode(_gradient(120, 80)), "captions": [b"x"]}
    rng = np.random.default_rng(1)
    train = transforms.TrainImage(SPEC, 32, crop_scale=(0.5, 1.0)).random_map(record, rng)
    evaluated = transforms.EvalImage(SPEC, 32).map(record)
    for out in (train, evaluated):
        assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
        assert out["captions"] == [b"x"]  # other fields pass through
    with pytest.raises(ValueError, match="crop_scale"):
        transforms.TrainImage(SPEC, 32, crop_scale=(0.0, 1.0))


def test_skipped_records_flow_through_untouched():
    skipped = transforms.TrainImage(SPEC, 32, (1.0, 1.0)).random_map(
        {"image": b"junk", "captions": [b"a"]}, np.random.default_rng(0)
    )
    assert skipped == SkippedRecord("undecodable_image")
    tokenizer = load_tokenizer(None)
    assert transforms.TokenizeCaption(tokenizer, 8).map(skipped) is skipped
    assert transforms.SelectKeys(["image"]).map(skipped) is skipped
    assert transforms.SampleCaption(SPEC).random_map(
        {"captions": [b"", b"  \t"]}, np.random.default_rng(0)
    ) == SkippedRecord("empty_caption")


def test_caption_sampling_covers_only_non_empty_captions():
    record = {"captions": [b"a red circle", b" ", b"a blue star", b""]}
    seen = {
        transforms.SampleCaption(SPEC).random_map(record, np.random.default_rng(i))["caption"]
        for i in range(50)
    }
    assert seen == {"a red circle", "a blue star"}


def test_all_captions_with_mask():
    tokenizer = load_tokenizer(None)
    record = {"captions": [b"a red circle", b"", b"a blue star", b"a green square", b"one more"]}
    out = transforms.TokenizeAllCaptions(SPEC, tokenizer, 10, num_captions=3).map(record)
    assert out["tokens"].shape == (3, 11) and out["tokens"].dtype == np.int32
    np.testing.assert_array_equal(out["caption_mask"], [True, True, True])
    assert [tokenizer.decode(t) for t in out["tokens"]] == [
        "a red circle",
        "a blue star",
        "a green square",
    ]
    short = transforms.TokenizeAllCaptions(SPEC, tokenizer, 10, 3).map({"captions": [b"a red"]})
    np.testing.assert_array_equal(short["caption_mask"], [True, False, False])
    assert (short["tokens"][1:] == 0).all()


def test_mask_skipped_keeps_shapes():
    placeholder = {"image": np.zeros((4, 4, 3), np.float32), "label": np.int32(0)}
    masker = transforms.MaskSkipped(placeholder)
    out = masker.map(SkippedRecord("image_too_small"))
    assert out["mask"] == np.bool_(False) and out["image"].shape == (4, 4, 3)
    good = masker.map({"image": np.ones((4, 4, 3), np.float32), "label": np.int32(5)})
    assert good["mask"] and good["label"] == 5
    assert math.isclose(float(good["image"].sum()), 48.0)
