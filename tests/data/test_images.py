"""Every PIL mode decodes to the 8-bit RGB its pixels mean (not what ``convert("RGB")`` alone
gives), in the training/evaluation decoder and for arrays TFDS decoded; bombs are refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import images, sources, transforms
from sycoca_jax.data.skipping import BadRecord, SkippedRecord
from tests.data import image_fixtures as fx

WHITE = np.array(images.BACKGROUND)


def _decoded(data, size: int | None = None) -> np.ndarray:
    """What training reads: open, whole image as the crop, resized to its own size (uniform
    patches make the bicubic resize exact)."""
    image = images.open_image(data)
    width, height = image.size
    return images.crop_and_resize(image, (0, 0, width, height), size or width)


def _over_white(colour, alpha):
    """Independent reference: ``colour`` over white with 8-bit ``alpha``."""
    colour, alpha = np.asarray(colour, np.float64), np.asarray(alpha, np.float64)[..., None]
    return np.rint(colour * alpha / 255 + WHITE * (1 - alpha / 255)).astype(np.uint8)


def test_sixteen_bit_greys_are_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(4, axis=0)
    png = fx.encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    out = _decoded(png)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])  # convert("RGB"): 0,255,255,255
    assert (out == out[..., :1]).all()  # grey
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode "I" (PIL's older 16-bit reading)
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(np.asarray(images.to_rgb(as_int32))[0, :, 0], [0, 1, 128, 255])


def test_float_images_keep_pils_0_to_255_reading_clipped():
    values = np.array([[-5.0, 0.4, 127.6, 300.0]], np.float32)
    out = np.asarray(images.to_rgb(Image.fromarray(values)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 128, 255])


CMYK_INKS = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 0), (40, 90, 160, 60)]


def test_cmyk_jpeg_without_a_profile_uses_the_plain_formula():
    jpeg = fx.encode(fx.cmyk_patches(CMYK_INKS), "JPEG", quality=100)
    assert Image.open(io.BytesIO(jpeg)).mode == "CMYK"
    out = fx.patch_centres(_decoded(jpeg), len(CMYK_INKS))
    inks = np.array(CMYK_INKS, np.float64)
    expected = (255 - inks[:, :3]) * (255 - inks[:, 3:]) / 255  # no ink is white
    np.testing.assert_allclose(out, expected, atol=3)


def test_cmyk_jpeg_with_an_icc_profile_is_converted_through_it():
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 0), (0, 0, 0, 255)]
    jpeg = fx.encode(fx.cmyk_patches(inks), "JPEG", quality=100, icc_profile=fx.cmyk_profile())
    out = fx.patch_centres(_decoded(jpeg), len(inks))
    expected = [fx.ink_colour(*(int(v > 0) for v in ink)) for ink in inks]
    # red, green, blue, black, black: the plain formula gives cyan, magenta, yellow, white, black
    np.testing.assert_allclose(out, expected, atol=12)  # the profile's 8-bit Lab table
    plain = fx.patch_centres(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), 5)
    assert np.abs(plain.astype(int) - np.array(expected)).max() == 255


def test_a_broken_profile_falls_back_to_the_plain_formula():
    image = fx.cmyk_patches([(255, 0, 0, 0)])
    image.info["icc_profile"] = b"not a profile"
    np.testing.assert_array_equal(np.asarray(images.to_rgb(image))[0, 0], [0, 255, 255])


def test_transparency_is_composited_over_the_stated_background():
    colour, alpha = (200, 40, 10), np.array([0, 64, 128, 255], np.uint8)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = colour, alpha[None, :]
    out = _decoded(fx.encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0], _over_white([colour] * 4, alpha))

    la = np.stack([np.full((4, 4), 90, np.uint8), np.broadcast_to(alpha, (4, 4))], axis=-1)
    out = _decoded(fx.encode(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(out[0], _over_white([(90, 90, 90)] * 4, alpha))

    premultiplied = Image.fromarray(rgba, "RGBA").convert("RGBa")
    np.testing.assert_allclose(
        np.asarray(images.to_rgb(premultiplied))[0], _over_white([colour] * 4, alpha), atol=2
    )


def test_palette_with_a_transparent_entry():
    palette = Image.new("P", (4, 4))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1] * 8)  # red, blue, red, blue, ...
    png = fx.encode(palette, "PNG", transparency=1)  # blue is transparent
    reopened = Image.open(io.BytesIO(png))
    assert reopened.mode == "P" and "transparency" in reopened.info
    np.testing.assert_array_equal(_decoded(png)[0], [[255, 0, 0], WHITE] * 2)
    opaque = fx.encode(palette, "PNG")
    np.testing.assert_array_equal(_decoded(opaque)[0], [[255, 0, 0], [0, 0, 255]] * 2)


def test_rgb_and_grey_with_a_transparent_colour():
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb.putpixel((1, 0), (1, 2, 3))
    out = _decoded(fx.encode(rgb, "PNG", transparency=(1, 2, 3)))
    np.testing.assert_array_equal(out[0, :2], [[10, 20, 30], WHITE])
    grey = Image.new("L", (4, 4), 50)
    grey.putpixel((0, 0), 7)
    out = _decoded(fx.encode(grey, "PNG", transparency=7))
    np.testing.assert_array_equal(out[0, :2], [WHITE, [50, 50, 50]])


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("YCbCr", (128, 128, 128), (128, 128, 128)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
    ],
)
def test_other_modes(mode, value, expected):
    out = np.asarray(images.to_rgb(Image.new(mode, (2, 2), value)))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], expected)


def test_arrays_decoded_by_tfds():
    """``image_decoder="tfds"`` hands over arrays: 1, 2 (grey + alpha), 3 or 4 (RGBA) channels,
    uint8 or uint16."""
    grey16 = np.array([[0, 257, 65535]], np.uint16)
    np.testing.assert_array_equal(np.asarray(images.array_to_image(grey16))[0, :, 0], [0, 1, 255])
    rgba = np.array([[[200, 40, 10, 64]]], np.uint8)
    np.testing.assert_array_equal(
        np.asarray(images.array_to_image(rgba))[0, 0], _over_white([200, 40, 10], 64)
    )
    la = np.array([[[90, 128]]], np.uint8)
    np.testing.assert_array_equal(
        np.asarray(images.array_to_image(la))[0, 0], _over_white([90, 90, 90], 128)
    )
    grey = np.full((2, 2, 1), 9, np.uint8)
    np.testing.assert_array_equal(np.asarray(images.array_to_image(grey)), np.full((2, 2, 3), 9))
    with pytest.raises(BadRecord, match="shape"):
        images.array_to_image(np.zeros((2, 2, 5), np.uint8))


def test_decompression_bombs_are_skipped_from_the_header():
    with pytest.raises(BadRecord) as error:
        images.open_image(fx.png_claiming_size(200, 100), max_image_pixels=19_999)
    assert error.value.reason == "image_too_large"
    assert images.open_image(fx.png_claiming_size(200, 100), max_image_pixels=20_000)
    huge = fx.png_claiming_size(20_000, 20_000)  # 400M px: PIL itself refuses it at open
    with pytest.raises(BadRecord) as error:
        images.open_image(huge)
    assert error.value.reason == "image_too_large"
    record = {"image": huge, "captions": [b"x"]}
    spec = sources.DatasetSpec()
    assert transforms.EvalImage(spec, 8).map(record) == SkippedRecord("image_too_large")
