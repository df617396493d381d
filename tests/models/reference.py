"""An independent NumPy transformer used as a reference: loops and plain formulas, no flax."""

from __future__ import annotations

import numpy as np


def layer_norm(x: np.ndarray, p: dict) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def attention(
    xq: np.ndarray, xkv: np.ndarray, p: dict, mask: np.ndarray | None = None
) -> np.ndarray:
    """xq (T, D), xkv (S, D') -> (T, D_out); mask (T, S) True = attend."""
    proj = lambda x, name: (
        np.einsum("sd,dhk->shk", x, np.asarray(p[name]["kernel"])) + np.asarray(p[name]["bias"])
    )  # noqa: E731
    q, k, v = proj(xq, "query"), proj(xkv, "key"), proj(xkv, "value")
    logits = np.einsum("thk,shk->hts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask[None], logits, -np.inf)
    logits = logits - logits.max(-1, keepdims=True)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    out = np.einsum("hts,shk->thk", weights, v)
    return np.einsum("thk,hkd->td", out, np.asarray(p["out"]["kernel"])) + np.asarray(
        p["out"]["bias"]
    )


def block(x: np.ndarray, p: dict, mask: np.ndarray | None = None) -> np.ndarray:
    y = layer_norm(x, p["ln_self"])
    x = x + attention(y, y, p["self_attention"], mask)
    y = layer_norm(x, p["ln_mlp"])
    h = gelu(y @ np.asarray(p["mlp"]["fc1"]["kernel"]) + np.asarray(p["mlp"]["fc1"]["bias"]))
    return x + h @ np.asarray(p["mlp"]["fc2"]["kernel"]) + np.asarray(p["mlp"]["fc2"]["bias"])


def patches_by_loop(image: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) -> (N, p*p*C) with explicit loops over the grid."""
    h, w, _ = image.shape
    out = []
    for gy in range(h // patch):
        for gx in range(w // patch):
            out.append(
                image[gy * patch : (gy + 1) * patch, gx * patch : (gx + 1) * patch].reshape(-1)
            )
    return np.stack(out)


def vit_encode(
    image: np.ndarray, indices: np.ndarray, p: dict, patch: int, depth: int
) -> np.ndarray:
    """Gather the chosen patches first, then encode only them."""
    pixels = patches_by_loop(image, patch)[indices]
    pos = np.asarray(p["posemb"]["pos_embedding"])[indices]
    x = (
        pixels @ np.asarray(p["patch_embedding"]["kernel"])
        + np.asarray(p["patch_embedding"]["bias"])
        + pos
    )
    for i in range(depth):
        x = block(x, p["encoder"][f"block_{i}"])
    return layer_norm(x, p["ln_final"])
