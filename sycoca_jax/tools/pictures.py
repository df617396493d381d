"""What attentive masking does to one image, as a picture (NumPy + PIL, no model).

A row per image: the image, the relevance heat map over it, the patches the captioner keeps
(others dimmed), the patches TG-MIM hides (grey), TG-MIM's reconstruction (hidden patches
predicted, de-normalised with the true patch's mean and std as ``norm_pix_loss`` trains them,
visible ones as they are), and under it the reference and the generated caption.
``panel_rows`` gives the rows as arrays (also for TensorBoard), ``row_image`` adds the text.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sycoca_jax.models.pixels import CLIP_MEAN, CLIP_STD

PANELS = ("image", "relevance", "caption keeps", "TG-MIM hides", "reconstruction")
DIM = 0.2  # brightness left to patches the captioner drops
HIDDEN_GREY = 128


def to_pixels(normalised: np.ndarray) -> np.ndarray:
    """CLIP-normalised images (..., 3) float -> uint8 pixels."""
    pixels = (np.asarray(normalised, np.float32) * CLIP_STD + CLIP_MEAN) * 255.0
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def as_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are; CLIP-normalised floats (what the model takes as well) -> uint8."""
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else to_pixels(image)


def as_normalised(image: np.ndarray) -> np.ndarray:
    """uint8 pixels -> CLIP-normalised float32 (``models.pixels.normalize`` in NumPy); floats are
    taken as normalised already."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        return image.astype(np.float32)
    return ((image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def patch_mask_image(mask: np.ndarray, image_size: int) -> np.ndarray:
    """(N,) per-patch values on a square grid -> (size, size) per-pixel values."""
    grid = int(round(np.sqrt(mask.shape[-1])))
    if grid * grid != mask.shape[-1] or image_size % grid:
        raise ValueError(f"{mask.shape[-1]} patches do not tile a {image_size}-pixel image")
    cell = image_size // grid
    return np.kron(np.asarray(mask).reshape(grid, grid), np.ones((cell, cell), mask.dtype))


def heat_map(pixels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The image half-covered by a blue (low) to red (high) map of the per-patch scores, each
    image scaled to its own range."""
    s = np.asarray(scores, np.float32)
    s = (s - s.min()) / max(float(s.max() - s.min()), 1e-12)
    s = patch_mask_image(s, pixels.shape[0])[..., None]
    colour = np.concatenate([s, np.zeros_like(s), 1.0 - s], axis=-1) * 255.0
    return np.round(0.5 * pixels + 0.5 * colour).astype(np.uint8)


def kept_view(pixels: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Kept patches as they are, the others dimmed to ``DIM``."""
    keep = patch_mask_image(np.asarray(kept, np.float32), pixels.shape[0])[..., None]
    return np.round(pixels * (keep + (1 - keep) * DIM)).astype(np.uint8)


def hidden_view(pixels: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Hidden patches grey, the others as they are."""
    hide = patch_mask_image(np.asarray(hidden, bool), pixels.shape[0])
    out = pixels.copy()
    out[hide] = HIDDEN_GREY
    return out


def reconstruction(
    image: np.ndarray,
    prediction: np.ndarray,
    hidden: np.ndarray,
    patch_size: int,
    normalised_targets: bool = True,
) -> np.ndarray:
    """Pixels of ``image`` (H, W, 3; uint8 or CLIP-normalised) with its ``hidden`` patches
    replaced by ``prediction`` (N, p*p*3); with ``normalised_targets`` (``norm_pix_loss``) the
    prediction is in units of each true (normalised) patch's own mean and std and is mapped back
    with them."""
    image = as_normalised(image)
    h = image.shape[0]
    grid = h // patch_size
    patches = (
        image.reshape(grid, patch_size, grid, patch_size, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(grid * grid, -1)
    )
    predicted = np.asarray(prediction, np.float32)
    if normalised_targets:
        mean = patches.mean(-1, keepdims=True)
        std = np.sqrt(patches.var(-1, keepdims=True) + 1e-6)
        predicted = predicted * std + mean
    merged = np.where(np.asarray(hidden, bool)[:, None], predicted, patches)
    merged = merged.reshape(grid, grid, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4)
    return to_pixels(merged.reshape(h, h, 3))


def panel_rows(
    images: np.ndarray,
    relevance: np.ndarray,
    kept: np.ndarray,
    hidden: np.ndarray,
    prediction: np.ndarray | None,
    patch_size: int,
    scale: int = 2,
    normalised_targets: bool = True,
) -> np.ndarray:
    """(B, H*scale, 5*W*scale, 3) uint8: ``PANELS`` side by side for each image.

    images (B, H, W, 3) uint8 pixels or CLIP-normalised floats; relevance (B, N); kept/hidden
    (B, N) bool; prediction (B, N, p*p*3) or None (no TG-MIM: the last panel repeats the
    image)."""
    rows = []
    for b in range(len(images)):
        pixels = as_pixels(images[b])
        recon = (
            pixels
            if prediction is None
            else reconstruction(images[b], prediction[b], hidden[b], patch_size, normalised_targets)
        )
        panels = [
            pixels,
            heat_map(pixels, relevance[b]),
            kept_view(pixels, kept[b]),
            hidden_view(pixels, hidden[b]),
            recon,
        ]
        row = np.concatenate(panels, axis=1)
        rows.append(np.kron(row, np.ones((scale, scale, 1), np.uint8)))
    return np.stack(rows)


def row_image(row: np.ndarray, lines: list[str], titles: tuple[str, ...] = PANELS) -> Image.Image:
    """One row with the panel titles above and ``lines`` of text (the captions) below."""
    font = ImageFont.load_default(size=11)
    line_height = 14
    height, width = row.shape[:2]
    canvas = Image.new("RGB", (width, height + line_height * (1 + len(lines)) + 4), "white")
    canvas.paste(Image.fromarray(row), (0, line_height))
    draw = ImageDraw.Draw(canvas)
    panel = width // len(titles)
    for i, title in enumerate(titles):
        draw.text((i * panel + 2, 1), title, fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((2, height + line_height * (i + 1) + 2), line, fill="black", font=font)
    return canvas
