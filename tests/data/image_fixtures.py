"""Images in every PIL mode, encoded, with the 8-bit RGB each must decode to; and a CMYK ICC
profile written from scratch (no profile file is committed).

The profile (ICC v2, output class, CMYK -> Lab, one 2-point lut8 table) makes pure cyan, magenta
and yellow ink print as the sRGB primaries red, green and blue, and any black ink print black: far
from what PIL's plain CMYK formula gives, so a decoder that ignores the profile fails. Its table
entries come from ``srgb_to_lab_d50``, the textbook sRGB -> CIELAB (D50, Bradford) conversion.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

_D50 = np.array([0.9642, 1.0, 0.8249])


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def srgb_to_lab_d50(rgb) -> np.ndarray:
    """8-bit sRGB -> CIELAB relative to D50 (the ICC connection space)."""
    c = np.asarray(rgb, np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz_d65 = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    bradford_d65_to_d50 = np.array(
        [
            [1.0478112, 0.0228866, -0.0501270],
            [0.0295424, 0.9904844, -0.0170491],
            [-0.0092345, 0.0150436, 0.7521316],
        ]
    )
    t = bradford_d65_to_d50 @ to_xyz_d65 @ linear / _D50
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def ink_colour(c: int, m: int, y: int, k: int) -> tuple[int, int, int]:
    """What the test profile prints for full (1) or no (0) ink of each colour."""
    return (0, 0, 0) if k else (255 * c, 255 * m, 255 * y)


def _s15(value: float) -> bytes:
    return struct.pack(">i", int(round(value * 65536)))


def cmyk_profile() -> bytes:
    """The test CMYK profile (module docstring) as ICC bytes."""
    table = bytearray()
    for c in (0, 1):  # the first input channel varies slowest
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    lightness, a, b = srgb_to_lab_d50(ink_colour(c, m, y, k))
                    table += bytes(
                        int(round(np.clip(v, 0, 255)))
                        for v in (lightness * 255 / 100, a + 128, b + 128)
                    )
    identity = bytes(range(256))
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + identity * 4 + table + identity * 3
    text = b"sycoca_jax test CMYK"
    description = b"desc" + bytes(4) + struct.pack(">I", len(text) + 1) + text + bytes(1 + 78)
    white = b"XYZ " + bytes(4) + b"".join(_s15(v) for v in _D50)
    tags = [(b"desc", description), (b"wtpt", white), (b"cprt", b"text" + bytes(4) + b"none\0")]
    tags.append((b"A2B0", lut))
    offset = 128 + 4 + 12 * len(tags)
    directory, body = b"", b""
    for signature, data in tags:
        body += bytes(-(offset + len(body)) % 4)
        directory += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
    header += bytes(12) + b"acsp" + bytes(32) + b"".join(_s15(v) for v in _D50)
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + directory + body


def cmyk_patches(inks: list[tuple[int, int, int, int]], side: int = 16) -> Image.Image:
    """A row of flat ``side``-pixel CMYK squares (flat 8x8 blocks survive JPEG exactly)."""
    image = Image.new("CMYK", (side * len(inks), side))
    for i, ink in enumerate(inks):
        image.paste(ink, (i * side, 0, (i + 1) * side, side))
    return image


def patch_centres(array: np.ndarray, count: int, side: int = 16) -> np.ndarray:
    """The pixel at the centre of each of ``count`` patches, (count, 3)."""
    return np.stack([array[side // 2, i * side + side // 2] for i in range(count)])


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
