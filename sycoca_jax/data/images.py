"""Decoding images to 8-bit RGB, shared by the converter and the training/evaluation transforms.

Every PIL mode becomes RGB by what its pixels mean, not by ``convert("RGB")`` alone, which clips
16-bit values (a 16-bit PNG turns all white) and ignores colour profiles:

* ``I;16*`` / ``I`` (16-bit integers): scaled to 8 bit (``v / 257``, rounded); ``F``: PIL's
  0..255 reading, clipped;
* ``CMYK`` (YCCK JPEGs decode to it too): through the embedded ICC profile to sRGB when there is
  one (``PIL.ImageCms``), else PIL's plain formula;
* anything with transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette
  or RGB/L images with a ``transparency`` colour): composited over ``BACKGROUND``;
* the rest (``1``, ``L``, ``P``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``): PIL's conversion.

Images above ``MAX_IMAGE_PIXELS`` (decompression bombs) are refused from their header, before
any pixel is decoded.
"""

from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageCms

from sycoca_jax.data.skipping import BadRecord

# Transparent pixels are shown over white, as a web page or document would show them.
BACKGROUND = (255, 255, 255)
# PIL's own warning threshold (~256 MiB of RGB pixels); larger images are skipped.
MAX_IMAGE_PIXELS = 89_478_485
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}


def open_image(
    data: bytes | np.ndarray,
    min_image_size: int = 1,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Opens encoded bytes (header only: decoding waits for the crop) or a decoded array.

    Raises ``BadRecord`` for bytes PIL cannot identify, for images smaller than
    ``min_image_size`` on their short side and for images of more than ``max_image_pixels``.
    """
    if isinstance(data, np.ndarray):
        image = array_to_image(data)
    else:
        try:
            with warnings.catch_warnings():  # we apply our own limit just below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(data)))
        except Image.DecompressionBombError as e:
            raise BadRecord("image_too_large", str(e)) from e
        except Exception as e:  # PIL raises several types for unreadable data
            raise BadRecord("undecodable_image", str(e)) from e
    width, height = image.size
    if width * height > max_image_pixels:
        raise BadRecord("image_too_large", f"{width}x{height} > {max_image_pixels} pixels")
    if min(image.size) < min_image_size:
        raise BadRecord("image_too_small", f"{image.size} < {min_image_size}")
    return image


def array_to_image(array: np.ndarray) -> Image.Image:
    """A decoded array (``image_decoder="tfds"``) as an RGB image: 1 channel is grey, 2 grey +
    alpha, 4 RGBA (composited over ``BACKGROUND``); uint16 values are scaled to 8 bit."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise BadRecord("undecodable_image", f"an image array of shape {array.shape}")
    if array.dtype == np.uint16:
        array = _sixteen_to_eight(array)
    elif array.dtype != np.uint8:
        raise BadRecord("undecodable_image", f"an image array of dtype {array.dtype}")
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if array.shape[-1] == 3:
        return Image.fromarray(np.ascontiguousarray(array))
    colour, alpha = array[..., :-1], array[..., -1:]
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    return Image.fromarray(composite(colour, alpha))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 (``v / 257`` rounded: 65535 -> 255, 257 -> 1)."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour`` (..., 3) uint8 over ``BACKGROUND`` with ``alpha`` (..., 1) uint8, rounded."""
    background = np.asarray(BACKGROUND, np.int32)
    a = alpha.astype(np.int32)
    mixed = colour.astype(np.int32) * a + background * (255 - a)
    return ((mixed + 127) // 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (any PIL mode, already opened) as 8-bit RGB; see the module docstring."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT:
        grey = _sixteen_to_eight(np.asarray(image))
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode in _ALPHA or "transparency" in image.info:
        rgba = np.asarray(image.convert(_ALPHA.get(mode, "RGBA")).convert("RGBA"))
        return Image.fromarray(composite(rgba[..., :3], rgba[..., 3:]))
    return image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the embedded ICC profile when there is a usable one, else PIL's formula."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            return ImageCms.applyTransform(image, _cmyk_to_srgb(bytes(profile)))
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unreadable or non-CMYK profile: the plain formula is the best left
    return image.convert("RGB")


@functools.lru_cache(maxsize=16)
def _cmyk_to_srgb(profile: bytes) -> ImageCms.ImageCmsTransform:
    """The colour transform of one embedded profile (photos of one source share a few)."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), "CMYK", "RGB")


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Inception-style crop ``(left, top, right, bottom)``: area fraction in ``scale``, aspect
    ratio (log-uniform) in ``ratio``; falls back to the largest centred crop within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    if scale[0] < 1.0:
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of side ``min(width, height)``: resize-shorter-side + centre crop."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_and_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Decodes ``image`` (JPEGs at a reduced scale when the crop is at least twice ``size``),
    converts it to RGB (``to_rgb``), crops ``box`` and resizes it (bicubic) to ``size`` x
    ``size``; uint8 RGB.

    Raises ``BadRecord`` when the pixel data cannot be decoded (e.g. a truncated file).
    """
    left, top, right, bottom = box
    try:
        if image.format == "JPEG":
            full_w, full_h = image.size
            need_w = math.ceil(full_w * size / max(right - left, 1))
            need_h = math.ceil(full_h * size / max(bottom - top, 1))
            if need_w * 2 <= full_w and need_h * 2 <= full_h:
                image.draft("RGB", (need_w, need_h))  # YCbCr decodes to RGB; CMYK stays CMYK
                fx, fy = image.size[0] / full_w, image.size[1] / full_h
                left, right, top, bottom = left * fx, right * fx, top * fy, bottom * fy
        resized = to_rgb(image).resize(
            (size, size), Image.Resampling.BICUBIC, box=(left, top, right, bottom)
        )
    except Exception as e:  # truncated or corrupt pixel data
        raise BadRecord("undecodable_image", str(e)) from e
    return np.asarray(resized, dtype=np.uint8)
