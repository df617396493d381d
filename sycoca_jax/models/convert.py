"""Parameter-tree conversions for reusing a checkpoint under another model layout or image size.

- Layer layout: ``model.scan=True`` keeps each ``BlockStack``'s blocks as one ``blocks`` subtree
  whose arrays are stacked on a leading ``layers`` axis; ``scan=False`` keeps ``block_0`` …
  ``block_{d-1}``. ``to_unrolled`` / ``to_scanned`` move between the two exactly.
- Image size: the learned position embeddings of the image encoder and of the TG-MIM decoder are
  one vector per patch of a (gh, gw) grid; ``resample_posemb`` interpolates them onto another
  grid (CoCa fine-tunes at a higher resolution than it pretrains at).

Everything here is a pure function of host (NumPy) or device arrays; nothing is read or written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = "blocks"
_UNROLLED = re.compile(r"^block_(\d+)$")
# Modules holding a learned (gh*gw, width) ``pos_embedding`` over the image's patch grid.
IMAGE_POSEMBS = (("image_encoder", "posemb"), ("tgmim_decoder", "posemb"))
RESAMPLE_METHODS = ("bilinear", "bicubic")


class ConversionError(ValueError):
    """The parameters (or the requested size) cannot be converted as asked."""


def _stack(leaves: list[Any]) -> Any:
    return jnp.stack(leaves) if isinstance(leaves[0], jax.Array) else np.stack(leaves)


def _unrolled_depth(tree: Mapping[str, Any]) -> int | None:
    """d when the keys are exactly block_0 … block_{d-1}, else None."""
    matches = [_UNROLLED.match(k) for k in tree]
    if not tree or not all(matches):
        return None
    indices = sorted(int(m.group(1)) for m in matches)
    return len(indices) if indices == list(range(len(indices))) else None


def to_unrolled(params: Any) -> Any:
    """Every scanned block stack (``{"blocks": stacked}``) becomes ``block_0`` … ``block_{d-1}``;
    trees already unrolled come back unchanged."""
    if not isinstance(params, Mapping):
        return params
    if set(params) == {SCANNED}:
        stacked = params[SCANNED]
        depths = {x.shape[0] for x in jax.tree.leaves(stacked)}
        if len(depths) != 1:
            raise ConversionError(f"scanned blocks disagree on their layer count: {sorted(depths)}")
        (depth,) = depths
        return {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}
    return {k: to_unrolled(v) for k, v in params.items()}


def to_scanned(params: Any) -> Any:
    """Every unrolled block stack (``block_0`` … ``block_{d-1}``) becomes ``{"blocks": ...}`` with
    its arrays stacked on a leading layers axis; trees already scanned come back unchanged."""
    if not isinstance(params, Mapping):
        return params
    depth = _unrolled_depth(params)
    if depth is not None:
        blocks = [params[f"block_{i}"] for i in range(depth)]
        structures = {jax.tree.structure(b) for b in blocks}
        if len(structures) != 1:
            raise ConversionError("unrolled blocks differ in structure; they cannot share one scan")
        return {SCANNED: jax.tree.map(lambda *xs: _stack(list(xs)), *blocks)}
    return {k: to_scanned(v) for k, v in params.items()}


def _cubic(distance: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5, as PIL and ``jax.image`` use)."""
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _resample_matrix(n: int, m: int, method: str) -> np.ndarray:
    """(m, n) float64 weights taking n grid values to m.

    Each of the m new cells samples the old grid at its centre, (j + 0.5) * n / m - 0.5 in old
    cell indices (the grids cover the same image), with linear or Keys cubic weights. Values
    beyond the border are extended linearly (two cells each side), so the map is exact for
    constant and linear fields and the identity when m == n.
    """
    if method not in RESAMPLE_METHODS:
        raise ConversionError(f"resample method must be one of {RESAMPLE_METHODS}, got {method!r}")
    pad = 2
    extend = np.zeros((n + 2 * pad, n))  # old values -> old values padded by linear extension
    extend[pad : pad + n] = np.eye(n)
    for k in range(1, pad + 1):
        if n == 1:  # one cell: a constant field
            extend[pad - k, 0] = extend[pad + k, 0] = 1.0
            continue
        extend[pad - k, 0], extend[pad - k, 1] = 1 + k, -k
        extend[pad + n - 1 + k, n - 1], extend[pad + n - 1 + k, n - 2] = 1 + k, -k
    weights = np.zeros((m, n + 2 * pad))
    for j in range(m):
        position = (j + 0.5) * n / m - 0.5
        base = math.floor(position)
        taps = np.arange(base, base + 2) if method == "bilinear" else np.arange(base - 1, base + 3)
        distance = position - taps
        w = np.maximum(0.0, 1.0 - np.abs(distance)) if method == "bilinear" else _cubic(distance)
        weights[j, taps + pad] += w
    return weights @ extend


def resample_posemb(
    posemb: Any, old_grid: tuple[int, int], new_grid: tuple[int, int], method: str = "bilinear"
) -> np.ndarray:
    """Position embeddings (gh*gw, width) of a row-major grid -> (gh'*gw', width) of ``new_grid``,
    interpolated on the 2-D grid (separably, in float64), in the input's dtype."""
    posemb = np.asarray(posemb)
    (gh, gw), (nh, nw) = old_grid, new_grid
    if posemb.ndim != 2 or posemb.shape[0] != gh * gw:
        raise ConversionError(
            f"position embeddings of shape {posemb.shape} are not a {gh}x{gw} grid of vectors"
        )
    grid = posemb.astype(np.float64).reshape(gh, gw, -1)
    rows, cols = _resample_matrix(gh, nh, method), _resample_matrix(gw, nw, method)
    resampled = np.einsum("ih,jw,hwc->ijc", rows, cols, grid)
    return resampled.reshape(nh * nw, -1).astype(posemb.dtype)


def resample_image_posembs(
    params: Mapping[str, Any],
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    method: str = "bilinear",
) -> dict[str, Any]:
    """``params`` with every learned patch-grid position embedding (``IMAGE_POSEMBS``: the image
    encoder's and the TG-MIM decoder's, where present) resampled to ``new_grid``."""
    out = dict(params)
    for module, posemb in IMAGE_POSEMBS:
        if module not in out or posemb not in out[module]:
            continue  # fixed sincos2d embeddings, or a model without TG-MIM
        table = out[module][posemb]["pos_embedding"]
        try:
            resampled = resample_posemb(table, old_grid, new_grid, method)
        except ConversionError as error:
            raise ConversionError(f"{module}/{posemb}/pos_embedding: {error}") from None
        out[module] = {**out[module], posemb: {**out[module][posemb], "pos_embedding": resampled}}
    return out


def image_grid(image_size: int, patch_size: int) -> tuple[int, int]:
    """The (square) patch grid of an image size, with a clear error when it does not divide."""
    if image_size <= 0 or image_size % patch_size:
        raise ConversionError(
            f"image_size {image_size} must be a positive multiple of the patch size {patch_size}"
        )
    return (image_size // patch_size,) * 2


def convert(
    params: Mapping[str, Any],
    model: Mapping[str, Any],
    scan: bool | None = None,
    image_size: int | None = None,
    method: str = "bilinear",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, model config fields) converted to layout ``scan`` and/or ``image_size``; ``None``
    keeps the checkpoint's. Returns the new params and the updated model fields."""
    model = dict(model)
    out = dict(params)
    if scan is not None:
        out = to_scanned(out) if scan else to_unrolled(out)
        model["scan"] = bool(scan)
    if image_size is not None:
        old = image_grid(model["image_size"], model["patch_size"])
        new = image_grid(image_size, model["patch_size"])
        out = resample_image_posembs(out, old, new, method)
        model["image_size"] = int(image_size)
    return out, model
