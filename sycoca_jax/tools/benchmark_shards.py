"""Image-caption shards that look like img2dataset's, for measuring the input pipeline offline.

  python -m sycoca_jax.tools.benchmark_shards --output=/data/bench/shards --num_images=3000
  python -m sycoca_jax.data.prepare local --source=/data/bench/shards --name=bench \\
      --data_dir=/data/bench/tfds

The input pipeline's cost is set by JPEG decoding at the sizes real web data has, so the images
here are what img2dataset (``--resize_mode=keep_ratio --image_size=256``) writes: shorter side
256 px, varied aspect ratios, content with natural images' falling spectrum (smooth random fields
from coarse to fine, sharp-edged shapes over them, sensor-like noise) so that quality-90 JPEGs are
10-30 KB, as web photos at that size are. Captions are 10-30 words. Shards are ``00000.tar``
... holding ``<key>.jpg``, ``<key>.txt`` and ``<key>.json`` per sample, keys numbered as
img2dataset numbers them. Everything follows from the seed; no network.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Aspect ratios (long/short side) of web images: mostly 4:3, 3:2, 16:9 and square.
ASPECTS = (1.0, 1.0, 4 / 3, 4 / 3, 4 / 3, 3 / 2, 3 / 2, 16 / 9, 5 / 4, 2.0)
SUBJECTS = (
    "man woman child dog cat horse bird car bicycle boat train house bridge tree flower "
    "mountain beach street city kitchen table chair cake coffee book guitar team player "
    "building river lake forest field road sky sunset window door garden market crowd"
).split()
ADJECTIVES = (
    "old young small large red blue green white black wooden modern empty busy quiet "
    "beautiful colorful bright dark happy tall little famous traditional sunny snowy"
).split()
VERBS = (
    "standing sitting walking running looking playing holding waiting riding eating "
    "smiling working resting posing parked lying"
).split()
PLACES = (
    "in the park|on the street|at the beach|near the river|in front of a building|"
    "on a sunny day|during the festival|in the kitchen|at night|in the snow|on the table|"
    "in the city center|by the lake|under a tree|at the station|in a garden"
).split("|")
CONNECTIVES = ("and", "with", "while", "next to", "behind", "beside", "as")


def smooth_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) float in [0, 255]: random fields at octave scales, weighted so power
    falls with frequency as in photographs, channels correlated, plus fine noise."""
    out = np.zeros((height, width, 3), np.float32)
    cells = 2
    amplitude = 1.0
    while cells <= max(width, height) // 2:
        coarse = rng.normal(size=(cells, max(2, round(cells * width / height)), 3))
        # Mostly shared across channels (luminance), partly per channel (colour).
        coarse = 0.7 * coarse[..., :1] + 0.5 * coarse
        layer = np.stack(
            [
                np.asarray(
                    Image.fromarray(coarse[..., c].astype(np.float32), mode="F").resize(
                        (width, height), Image.BICUBIC
                    )
                )
                for c in range(3)
            ],
            axis=-1,
        )
        out += amplitude * layer
        cells *= 2
        amplitude *= 0.55
    out = (out - out.mean()) / (out.std() + 1e-6)
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    out = base + rng.uniform(35, 60) * out
    out += rng.normal(scale=rng.uniform(2.5, 6.0), size=out.shape).astype(np.float32)
    return np.clip(out, 0, 255)


def add_objects(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """Sharp-edged, half-transparent ellipses and polygons over the field: the edges that
    photographs have and smooth fields lack."""
    width, height = image.size
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(3, 9))):
        colour = (*(int(v) for v in rng.integers(0, 256, size=3)), int(rng.integers(120, 230)))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.3) * min(width, height)
        if rng.random() < 0.5:
            draw.ellipse(
                (x - radius, y - radius * rng.uniform(0.5, 1.5), x + radius, y + radius),
                fill=colour,
            )
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 7))))
            points = [(x + radius * np.cos(a), y + radius * np.sin(a)) for a in angles]
            draw.polygon(points, fill=colour)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def image_size(rng: np.random.Generator, short_side: int) -> tuple[int, int]:
    """(width, height): shorter side ``short_side``, landscape three times in four."""
    long_side = round(short_side * float(rng.choice(ASPECTS)))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def caption(rng: np.random.Generator) -> str:
    """10-30 words of plausible alt-text."""
    words: list[str] = []
    target = int(rng.integers(10, 31))
    while len(words) < target:
        clause = [
            "a",
            str(rng.choice(ADJECTIVES)),
            str(rng.choice(SUBJECTS)),
            str(rng.choice(VERBS)),
            str(rng.choice(PLACES)),
        ]
        if words:
            clause.insert(0, str(rng.choice(CONNECTIVES)))
        words.extend(" ".join(clause).split())
    text = " ".join(words[:target])
    return text[0].upper() + text[1:] + "."


def samples(
    num_images: int, seed: int, short_side: int = 256, quality: int = 90
) -> Iterator[tuple[bytes, str, int, int]]:
    """``(jpeg, caption, width, height)`` per image; image ``i`` depends on (seed, i) only."""
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        width, height = image_size(rng, short_side)
        image = add_objects(rng, Image.fromarray(smooth_field(rng, width, height).astype(np.uint8)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        yield buffer.getvalue(), caption(rng), width, height


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # same bytes on every run
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    output: str,
    num_images: int,
    *,
    seed: int = 0,
    shard_size: int = 1000,
    short_side: int = 256,
    quality: int = 90,
) -> dict:
    """Writes ``output/00000.tar`` ...; returns counts and JPEG size statistics."""
    os.makedirs(output, exist_ok=True)
    if any(name.endswith(".tar") for name in os.listdir(output)):
        raise FileExistsError(f"{output!r} already holds .tar shards; choose an empty folder")
    jpeg_bytes: list[int] = []
    tar = None
    for index, (jpeg, text, width, height) in enumerate(
        samples(num_images, seed, short_side, quality)
    ):
        shard, position = divmod(index, shard_size)
        if position == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(os.path.join(output, f"{shard:05d}.tar"), "w")
        key = f"{shard:05d}{position:04d}"
        meta = {"key": key, "status": "success", "caption": text, "width": width, "height": height}
        _add(tar, f"{key}.jpg", jpeg)
        _add(tar, f"{key}.txt", text.encode())
        _add(tar, f"{key}.json", json.dumps(meta).encode())
        jpeg_bytes.append(len(jpeg))
    if tar is not None:
        tar.close()
    sizes = np.asarray(jpeg_bytes, np.float64) / 1024
    return {
        "images": num_images,
        "shards": -(-num_images // shard_size),
        "jpeg_kib": {
            "mean": round(float(sizes.mean()), 1),
            "p5": round(float(np.percentile(sizes, 5)), 1),
            "median": round(float(np.median(sizes)), 1),
            "p95": round(float(np.percentile(sizes, 95)), 1),
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sycoca_jax.tools.benchmark_shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", required=True, help="folder for the .tar shards")
    parser.add_argument("--num_images", type=int, default=3000)
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--short_side", type=int, default=256, help="shorter image side, px")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = write_shards(
        args.output,
        args.num_images,
        seed=args.seed,
        shard_size=args.shard_size,
        short_side=args.short_side,
        quality=args.quality,
    )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
