"""Scenes of coloured shapes with captions, a class label and question/answer pairs.

The generator behind the embedded ``sycoca_shapes`` dataset: pure Python + PIL, no download, and
every example is a function of ``(seed, split, index)`` only, so any slice of any split can be
regenerated on its own (and in parallel) with identical bytes.

A scene holds 1 to 3 shapes in distinct cells of a 3x3 grid. The first shape is the *main* shape:
it is strictly the largest, and its ``colour kind`` is the class label (``CLASS_NAMES``). No two
shapes of a scene share colour and kind, so "the red circle" always names one shape.

Compositional split: the ``HELD_OUT`` colour/kind pairs never appear in ``train`` or
``validation``; in ``test`` a fraction of scenes (``compositional=True``) has a held-out pair as
its main shape.
"""

from __future__ import annotations

import dataclasses
import io
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (148, 70, 200),
    "orange": (255, 127, 14),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "medium", "large")
# Radius of each size as a fraction of a grid cell's side.
_SIZE_RADIUS = {"small": 0.24, "medium": 0.34, "large": 0.46}
POSITIONS = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "centre",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
NUMBER_WORDS = ("zero", "one", "two", "three")
# Class label = index of the main shape's "colour kind" in this list (colour-major).
CLASS_NAMES = tuple(f"{colour} {kind}" for colour in COLOUR_NAMES for kind in KINDS)
# One pair per colour, never seen in train/validation; the compositional part of test uses them.
HELD_OUT = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "diamond"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "star"),
)
SPLITS = ("train", "validation", "test")
NUM_CAPTIONS = 5
NUM_QUESTIONS = 4
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then box-filtered down


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: int  # 0..8, row-major over the 3x3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # shapes[0] is the main (largest) shape
    background: tuple[int, int, int]
    jitter: tuple[tuple[float, float], ...]  # per-shape offset within its cell, in [-1, 1]
    rotation: tuple[float, ...]  # per-shape rotation in degrees (not mentioned in text)
    compositional: bool

    @property
    def main(self) -> Shape:
        return self.shapes[0]

    @property
    def label(self) -> int:
        return CLASS_NAMES.index(self.main.name)


@dataclasses.dataclass(frozen=True)
class Example:
    """Everything one dataset record holds, before image encoding. ``clutter`` (a
    ``sycoca_jax.data.clutter.Clutter``) is the undescribed content of ``clutter`` builds."""

    scene: Scene
    captions: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    clutter: Any = None


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one example: independent of every other example and of the order."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def sample_scene(rng: np.random.Generator, *, compositional: bool = False) -> Scene:
    """Draws a scene; ``compositional`` forces a held-out colour/kind pair as the main shape."""
    held_out = set(HELD_OUT)
    num_shapes = int(rng.integers(1, 4))
    cells = rng.choice(9, size=num_shapes, replace=False)
    if compositional:
        colour, kind = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
    else:
        colour, kind = _allowed_pair(rng, held_out, used=set())
    # The main shape is strictly the largest: others are drawn from the smaller sizes.
    main_size = SIZES[int(rng.integers(1 if num_shapes > 1 else 0, len(SIZES)))]
    shapes = [Shape(kind, colour, main_size, int(cells[0]))]
    used = {(colour, kind)}
    for cell in cells[1:]:
        colour, kind = _allowed_pair(rng, held_out, used)
        used.add((colour, kind))
        size = SIZES[int(rng.integers(0, SIZES.index(main_size)))]
        shapes.append(Shape(kind, colour, size, int(cell)))
    grey = int(rng.integers(25, 90))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    jitter = tuple((float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))) for _ in shapes)
    rotation = tuple(float(rng.uniform(-15, 15)) for _ in shapes)
    return Scene(tuple(shapes), background, jitter, rotation, compositional)


def _allowed_pair(
    rng: np.random.Generator, held_out: set[tuple[str, str]], used: set[tuple[str, str]]
) -> tuple[str, str]:
    while True:
        pair = (COLOUR_NAMES[int(rng.integers(len(COLOURS)))], KINDS[int(rng.integers(len(KINDS)))])
        if pair not in held_out and pair not in used:
            return pair


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draws the scene (supersampled, then downsampled for smooth edges) as an RGB image."""
    big = image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw_shapes(ImageDraw.Draw(image), scene, big)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def draw_shapes(draw: ImageDraw.ImageDraw, scene: Scene, side: float) -> None:
    """Draws the scene's shapes onto a ``side`` x ``side`` canvas."""
    for i, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape.kind, *placement(scene, i, side), COLOURS[shape.colour])


def placement(scene: Scene, i: int, side: float) -> tuple[float, float, float, float]:
    """(centre x, centre y, radius, rotation in degrees) of shape ``i`` on a canvas of ``side``."""
    shape, (jx, jy) = scene.shapes[i], scene.jitter[i]
    cell = side / 3
    radius = _SIZE_RADIUS[shape.size] * cell
    slack = cell / 2 - radius
    row, col = divmod(shape.cell, 3)
    cx = (col + 0.5) * cell + 0.6 * slack * jx
    cy = (row + 0.5) * cell + 0.6 * slack * jy
    return cx, cy, radius, scene.rotation[i]


def object_masks(scene: Scene, image_size: int) -> np.ndarray:
    """(num shapes, size, size) float32: the share of each pixel that each described shape
    covers, rendered exactly as ``render`` draws it (supersampled, box-filtered)."""
    big = image_size * SUPERSAMPLE
    masks = []
    for i, shape in enumerate(scene.shapes):
        canvas = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(canvas), shape.kind, *placement(scene, i, big), 255)
        small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
        masks.append(np.asarray(small, np.float32) / 255.0)
    return np.stack(masks)


def patch_coverage(masks: np.ndarray, patch_size: int) -> np.ndarray:
    """(K, H, W) pixel coverage -> (K, N) share of each patch covered, patches in row-major grid
    order (the order of ``sycoca_jax.models.vit.patchify``)."""
    k, h, w = masks.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    grid = masks.reshape(k, h // patch_size, patch_size, w // patch_size, patch_size)
    return grid.mean(axis=(2, 4)).reshape(k, -1)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    r: float,
    angle: float,
    fill: tuple[int, int, int] | int,
) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if kind == "square":
        corners, radii = 4, [r * 0.95] * 4
        start = 45.0
    elif kind == "diamond":
        corners, radii = 4, [r, r * 0.7, r, r * 0.7]
        start = 90.0
    elif kind == "triangle":
        corners, radii = 3, [r] * 3
        start = 90.0
    else:  # star
        corners, radii = 10, [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        start = 90.0
    theta = np.deg2rad(start + angle + 360.0 / corners * np.arange(corners))
    points = [
        (cx + rad * np.cos(t), cy - rad * np.sin(t)) for rad, t in zip(radii, theta, strict=True)
    ]
    draw.polygon(points, fill=fill)


def _relation(a: Shape, b: Shape, rng: np.random.Generator) -> str:
    """A spatial relation that holds between ``a`` and ``b`` (as in "a is ___ b")."""
    ra, ca = divmod(a.cell, 3)
    rb, cb = divmod(b.cell, 3)
    options = []
    if ca < cb:
        options.append("to the left of")
    if ca > cb:
        options.append("to the right of")
    if ra < rb:
        options.append("above")
    if ra > rb:
        options.append("below")
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(shape: Shape, with_size: bool = True) -> str:
    phrase = f"{shape.size} {shape.name}" if with_size else shape.name
    return f"{_article(phrase)} {phrase}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene, rng: np.random.Generator, cluttered: bool = False) -> tuple[str, ...]:
    """Five differently phrased captions; each states colours/kinds, and between them sizes,
    positions, the count and spatial relations. ``cluttered``: the scene has undescribed
    content, so a lone shape is not called alone (the rng is drawn from identically)."""
    shapes = scene.shapes
    main, others = shapes[0], shapes[1:]
    count = NUMBER_WORDS[len(shapes)]
    noun = "shape" if len(shapes) == 1 else "shapes"
    picture = ("an image", "a picture")[int(rng.integers(2))]

    where = "in the" if len(shapes) == 1 else "at"  # keeps three-shape captions short
    full = _join([f"{_a(s)} {where} {s.position}" for s in shapes])
    listing = f"{count} {noun}: " + _join([_a(s, with_size=False) for s in shapes])
    if others:
        other = others[int(rng.integers(len(others)))]
        relation = f"{_a(main, False)} {_relation(main, other, rng)} {_a(other, False)}"
        neighbours = _join([_a(s) for s in others])
        largest = f"the largest shape is {_a(main, False)}, next to {neighbours}"
    else:
        alone = f"in the {main.position}" if cluttered else "alone on a dark background"
        relation = f"{_a(main, False)} {alone}"
        largest = f"a single {main.size} {main.kind}, coloured {main.colour}"
    located = f"{picture} with a {main.kind} that is {main.colour} in the {main.position}"
    if others:
        located += f" and {count} {noun} in total"
    return (full, listing, relation, largest, located)


def questions_and_answers(
    scene: Scene, rng: np.random.Generator
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Four VQA pairs: colour, kind, count and position, in that order."""
    main = scene.main
    pick = scene.shapes[int(rng.integers(len(scene.shapes)))]
    where = scene.shapes[int(rng.integers(len(scene.shapes)))]
    questions = (
        "what colour is the largest shape?",
        f"what shape is in the {pick.position}?",
        "how many shapes are there?",
        f"where is the {where.name}?",
    )
    answers = (main.colour, pick.kind, NUMBER_WORDS[len(scene.shapes)], where.position)
    return questions, answers


def make_example(seed: int, split: str, index: int, compositional_fraction: float) -> Example:
    """The example at ``index`` of ``split``: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = example_rng(seed, split, index)
    compositional = split == "test" and rng.uniform() < compositional_fraction
    scene = sample_scene(rng, compositional=compositional)
    qs, ans = questions_and_answers(scene, rng)
    return Example(scene, captions(scene, rng), qs, ans)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
