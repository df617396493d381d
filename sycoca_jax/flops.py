"""Analytic forward FLOPs of a SyCoCa training step, per example.

Counted from the model fields alone: 2·m·k·n for every matmul, including the attention products
(QKᵀ and AV, full square for causal attention, which is what the kernels compute). Elementwise
work (softmax, LayerNorm, GELU) is left out. XLA's ``cost_analysis`` misses cuBLAS/cuDNN calls on
GPU, so MFU must come from this count; on CPU the two agree to within a few percent
(``tests/test_flops.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sycoca_jax.models import build, masking


def _dense(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _attention(
    q_len: int, kv_len: int, width: int, kv_width: int, out_width: int | None = None
) -> int:
    out_width = out_width or width
    return (
        _dense(q_len, width, out_width)  # query
        + 2 * _dense(kv_len, kv_width, out_width)  # key, value
        + 2 * 2 * q_len * kv_len * out_width  # scores and weighted sum
        + _dense(q_len, out_width, out_width)  # output
    )


def _mlp(tokens: int, width: int, hidden: int) -> int:
    return 2 * _dense(tokens, width, hidden)


def _block(
    tokens: int, width: int, mlp_dim: int, context_len: int = 0, context_width: int = 0
) -> int:
    flops = _attention(tokens, tokens, width, width) + _mlp(tokens, width, mlp_dim)
    if context_len:
        flops += _attention(tokens, context_len, width, context_width)
    return flops


def vit_flops(m: Mapping[str, Any], num_tokens: int) -> int:
    """``num_tokens`` patches (and the class token, if any) through the ViT."""
    patch_dim = m["patch_size"] ** 2 * 3
    seq = num_tokens + int(m.get("class_token", False))
    return _dense(num_tokens, patch_dim, m["image_width"]) + m["image_depth"] * _block(
        seq, m["image_width"], m["image_mlp_dim"]
    )


def _pooler(m: Mapping[str, Any], queries: int, tokens: int, in_width: int) -> int:
    return _attention(queries, tokens, m["text_width"], in_width)


def _pool_flops(m: Mapping[str, Any], num_tokens: int, contrastive: bool, captioning: bool) -> int:
    """Poolers over an encoded image: the contrastive vector and/or the caption tokens."""
    q, w, dv = m["caption_queries"], m["text_width"], m["image_width"]
    layout = m["pooler"]
    num_tokens += int(m.get("class_token", False))  # the poolers read the class token too
    flops = 0
    if layout == "none":  # the class token and the patch tokens are used as they are
        return 0
    if layout == "single":
        return _pooler(m, q, num_tokens, dv) if (contrastive or captioning) else 0
    if captioning or (contrastive and layout == "cascade"):
        flops += _pooler(m, q, num_tokens, dv)
    if contrastive:
        flops += _pooler(m, 1, q, w) if layout == "cascade" else _pooler(m, 1, num_tokens, dv)
    return flops


def forward_flops_per_example(m: Mapping[str, Any]) -> dict[str, int]:
    """Forward FLOPs of one training example, by part, plus ``total``."""
    m = build.model_fields(m)
    n = (m["image_size"] // m["patch_size"]) ** 2
    t = m["max_text_len"]
    w, dv, e = m["text_width"], m["image_width"], m["embed_dim"]
    parts: dict[str, int] = {}

    parts["text_encoder"] = m["text_depth"] * _block(t + 1, w, m["text_mlp_dim"]) + _dense(1, w, e)
    parts["image_encoder"] = vit_flops(m, n)
    parts["poolers"] = _pool_flops(m, n, contrastive=True, captioning=False) + _dense(1, w, e)

    attentive = (m["use_captioning"] and m["caption_masking"] == "attentive") or (
        m["use_tgmim"] and m["tgmim_masking"] == "attentive"
    )
    if attentive:
        # Patch value paths through the pooler(s), projections, cosine similarities.
        if m["pooler"] == "cascade":
            single = _dense(n, dv, w) + _dense(n, w, w) + 2 * _dense(n, w, w)
        elif m["pooler"] == "none":
            single = 0
        else:
            single = _dense(n, dv, w) + _dense(n, w, w)
        parts["relevance"] = single + _dense(n, w, e) + _dense(t, w, e) + 2 * n * t * e

    reencode = m["branch_encoding"] == "reencode"
    if m["use_captioning"]:
        k = n
        if m["caption_masking"] != "none":
            k = masking.static_count(n, m["caption_keep_ratio"], "caption_keep_ratio")
            if reencode:
                parts["image_encoder"] += vit_flops(m, k)
        num_image_tokens = m["caption_queries"] - (1 if m["pooler"] == "single" else 0)
        if m["pooler"] == "none":
            num_image_tokens = k
        parts["poolers"] += _pool_flops(m, k, contrastive=False, captioning=True)
        layer = _block(t, w, m["text_mlp_dim"], num_image_tokens, w)
        if m.get("layer_layout") == "open_clip":  # a second MLP per layer
            layer += _mlp(t, w, m["text_mlp_dim"])
        parts["multimodal_decoder"] = m["multimodal_depth"] * layer + _dense(t, w, m["vocab_size"])

    if m["use_tgmim"]:
        visible = n - masking.static_count(n, m["tgmim_mask_ratio"], "tgmim_mask_ratio")
        if reencode:
            parts["image_encoder"] += vit_flops(m, visible)
        d = m["decoder_width"]
        context = t if m["text_guided"] else 0
        parts["tgmim_decoder"] = (
            _dense(visible, dv, d)
            + m["decoder_depth"] * _block(n, d, m["decoder_mlp_dim"], context, w)
            + _dense(n, d, m["patch_size"] ** 2 * 3)
        )
    parts["total"] = sum(parts.values())
    return parts


def train_flops_per_example(m: Mapping[str, Any]) -> int:
    """Forward + backward ≈ 3 × forward (the backward pass costs two forward matmuls)."""
    return 3 * forward_flops_per_example(m)["total"]
