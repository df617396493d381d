"""Caption-unrelated content for the ``sycoca_shapes/clutter`` builds: the paper's premise that
much of an image is unrelated to its caption, made measurable.

A cluttered example is the plain example at the same ``(seed, split, index)`` (same described
shapes, captions, questions and compositional split; only a lone shape is not called "alone")
plus content that no caption mentions, drawn from a generator of its own:

- 2 to 4 *distractors* in free grid cells: rings, crosses, bars and hexagons in muted colours
  (``DISTRACTOR_KINDS``, ``DISTRACTOR_COLOURS``), none of them words of the captions;
- a textured background (``TEXTURES``: noise, stripes, checker, blotches) around the plain
  scene's dark grey.

So the two builds differ only by undescribed content, and ``shapes.object_masks`` (described
shapes only) says where the captions' objects are in both.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from PIL import Image, ImageDraw

from sycoca_jax.data import shapes

DISTRACTOR_KINDS = ("ring", "cross", "bar", "hexagon")
DISTRACTOR_COLOURS = {
    "grey": (150, 150, 150),
    "teal": (40, 140, 140),
    "pink": (230, 150, 190),
    "brown": (140, 90, 50),
    "olive": (120, 130, 40),
}
DISTRACTOR_COLOUR_NAMES = tuple(DISTRACTOR_COLOURS)
TEXTURES = ("noise", "stripes", "checker", "blotches")
_STREAM = 0xC1077E  # separates the clutter's random stream from the described scene's


@dataclasses.dataclass(frozen=True)
class Distractor:
    kind: str
    colour: str
    cell: int  # a grid cell no described shape uses
    radius: float  # fraction of a cell's side
    jitter: tuple[float, float]  # offset within the cell, in [-1, 1]
    rotation: float  # degrees

    @property
    def position(self) -> str:
        return shapes.POSITIONS[self.cell]


@dataclasses.dataclass(frozen=True)
class Clutter:
    """The undescribed part of a scene."""

    distractors: tuple[Distractor, ...]
    texture: str
    texture_seed: int
    amplitude: float  # grey levels of the texture's swing


def clutter_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The clutter's own generator: the described scene's draws are left untouched."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, _STREAM])


def sample_clutter(rng: np.random.Generator, scene: shapes.Scene) -> Clutter:
    """Distractors in cells the described shapes leave free, and a background texture."""
    free = [c for c in range(9) if c not in {s.cell for s in scene.shapes}]
    count = min(int(rng.integers(2, 5)), len(free))
    cells = rng.choice(np.asarray(free), size=count, replace=False)
    distractors = tuple(
        Distractor(
            kind=DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))],
            colour=DISTRACTOR_COLOUR_NAMES[int(rng.integers(len(DISTRACTOR_COLOURS)))],
            cell=int(cell),
            radius=float(rng.uniform(0.25, 0.45)),
            jitter=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
            rotation=float(rng.uniform(0, 180)),
        )
        for cell in cells
    )
    return Clutter(
        distractors=distractors,
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        texture_seed=int(rng.integers(2**31)),
        amplitude=float(rng.uniform(12, 36)),
    )


def make_example(
    seed: int, split: str, index: int, compositional_fraction: float
) -> shapes.Example:
    """The cluttered example at ``index`` of ``split``: a pure function of its arguments."""
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(shapes.SPLITS)}")
    rng = shapes.example_rng(seed, split, index)
    compositional = split == "test" and rng.uniform() < compositional_fraction
    scene = shapes.sample_scene(rng, compositional=compositional)
    qs, ans = shapes.questions_and_answers(scene, rng)
    captions = shapes.captions(scene, rng, cluttered=True)
    clutter = sample_clutter(clutter_rng(seed, split, index), scene)
    return shapes.Example(scene, captions, qs, ans, clutter)


def background(scene: shapes.Scene, clutter: Clutter, image_size: int) -> np.ndarray:
    """(size, size, 3) uint8: the scene's grey with the clutter's texture on top."""
    rng = np.random.default_rng(clutter.texture_seed)
    n, amp = image_size, clutter.amplitude
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) * (64.0 / n)  # patterns scale with the image
    if clutter.texture == "noise":
        pattern = rng.normal(0.0, amp / 2, size=(n, n, 3))
    elif clutter.texture == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
        phase = 2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period
        pattern = (amp / 2 * np.sign(np.sin(phase)))[..., None]
    elif clutter.texture == "checker":
        side = rng.uniform(3, 8)
        pattern = ((((x // side) + (y // side)) % 2 - 0.5) * amp)[..., None]
    else:  # blotches: smooth low-frequency colour noise
        coarse = rng.normal(0.0, 1.0, size=(5, 5, 3))
        channels = [
            np.asarray(
                Image.fromarray(coarse[..., c].astype(np.float32), mode="F").resize(
                    (n, n), Image.Resampling.BICUBIC
                )
            )
            for c in range(3)
        ]
        pattern = np.stack(channels, axis=-1) * amp / 2
    base = np.asarray(scene.background, np.float32)
    return np.clip(base + pattern, 0, 255).astype(np.uint8)


def render(scene: shapes.Scene, clutter: Clutter, image_size: int) -> Image.Image:
    """The textured background, the distractors, then the described shapes (as
    ``shapes.render`` draws them), supersampled and box-filtered."""
    big = image_size * shapes.SUPERSAMPLE
    texture = Image.fromarray(background(scene, clutter, image_size))
    image = texture.resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for distractor in clutter.distractors:
        _draw_distractor(draw, distractor, big)
    shapes.draw_shapes(draw, scene, big)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def distractor_masks(clutter: Clutter, image_size: int) -> np.ndarray:
    """(num distractors, size, size) float32: the share of each pixel each distractor covers,
    drawn as ``render`` draws it (``shapes.object_masks``' counterpart)."""
    big = image_size * shapes.SUPERSAMPLE
    masks = []
    for distractor in clutter.distractors:
        canvas = Image.new("L", (big, big), 0)
        _draw_distractor(ImageDraw.Draw(canvas), distractor, big, fill=255)
        small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
        masks.append(np.asarray(small, np.float32) / 255.0)
    return np.stack(masks) if masks else np.zeros((0, image_size, image_size), np.float32)


def render_example(example: shapes.Example, image_size: int) -> Image.Image:
    """The image of a plain or cluttered example."""
    if example.clutter is None:
        return shapes.render(example.scene, image_size)
    return render(example.scene, example.clutter, image_size)


def _rotated(points: np.ndarray, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    return [(cx + c * px - s * py, cy + s * px + c * py) for px, py in points]


def _draw_distractor(
    draw: ImageDraw.ImageDraw, d: Distractor, side: float, fill: int | None = None
) -> None:
    cell = side / 3
    r = d.radius * cell
    slack = cell / 2 - r
    row, col = divmod(d.cell, 3)
    cx = (col + 0.5) * cell + 0.6 * slack * d.jitter[0]
    cy = (row + 0.5) * cell + 0.6 * slack * d.jitter[1]
    fill = DISTRACTOR_COLOURS[d.colour] if fill is None else fill
    if d.kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, int(0.35 * r)))
        return
    if d.kind == "hexagon":
        theta = np.deg2rad(d.rotation + 60.0 * np.arange(6))
        draw.polygon(_rotated(np.stack([r * np.cos(theta), r * np.sin(theta)], 1), cx, cy, 0), fill)
        return
    w = 0.22 * r if d.kind == "cross" else 0.3 * r
    bar = np.array([(-r, -w), (r, -w), (r, w), (-r, w)])
    draw.polygon(_rotated(bar, cx, cy, d.rotation), fill)
    if d.kind == "cross":
        draw.polygon(_rotated(bar, cx, cy, d.rotation + 90.0), fill)
