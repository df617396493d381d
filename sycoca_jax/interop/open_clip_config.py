"""open_clip CoCa model configs <-> SyCoCa model fields (the presets: ``open_clip_presets``).

``model_fields(cfg)`` reads an open_clip model config (the JSON of ``open_clip/model_configs``,
e.g. ``coca_ViT-B-32.json``) and returns the SyCoCa fields that compute exactly what open_clip
3.3.0's ``CoCa`` computes; a setting we do not reproduce is an error naming it.
``open_clip_config(fields)`` is the way back, for exported weights.

What an open_clip CoCa is, in our fields: a ViT with a class token, ``ln_pre`` and a bias-free
patch convolution; either one attentional pooler over all its tokens (``attentional_pool``:
queried through a LayerNorm, followed by ``ln_post``; pooled token 0 is the contrastive vector,
the rest are the image tokens; our ``pooler="single"``) or none (``coca_base``: ``ln_post`` on
the encoder output, the class token is the contrastive vector and the patch tokens the image
tokens; our ``pooler="none"``); a text tower whose CLS state alone is LayerNormed, with the legacy
CLS mask; the two-block multimodal layer; LayerNorm epsilon 1e-5 and exact GELU.
"""

from __future__ import annotations

from typing import Any

from sycoca_jax.data.tokenizer import SpecialIds
from sycoca_jax.errors import UserError


class OpenClipError(UserError, ValueError):
    """open_clip weights or a config we cannot use as asked; the message says why and the fix."""


class OpenClipFileNotFoundError(UserError, FileNotFoundError):
    """A weights file or open_clip model config (``.json``) that is not there."""


CLIP_IDS = SpecialIds(pad=0, bos=49406, eos=49407)  # CLIP BPE: pad 0, <start/end_of_text>

# open_clip's defaults for every key we read (``CLIPVisionCfg``, ``CLIPTextCfg``,
# ``MultimodalCfg``); a key absent from a config takes these.
VISION_DEFAULTS = dict(
    layers=12,
    width=768,
    head_width=64,
    mlp_ratio=4.0,
    patch_size=16,
    image_size=224,
    attentional_pool=False,
    attn_pooler_queries=256,
    attn_pooler_heads=8,
    no_ln_pre=False,
    output_tokens=False,
    patch_dropout=0.0,
)
TEXT_DEFAULTS = dict(
    context_length=77,
    vocab_size=49408,
    width=512,
    heads=8,
    layers=12,
    mlp_ratio=4.0,
    embed_cls=False,
    pad_id=0,
    output_tokens=False,
)
# Keys that must keep open_clip's default value: we do not reproduce other values.
FIXED = dict(
    ls_init_value=None,
    pos_embed_type="learnable",
    final_ln_after_pool=False,
    act_kwargs=None,
    norm_kwargs=None,
    block_type=None,
    qk_norm=False,
    scaled_cosine_attn=False,
    scale_heads=False,
    scale_attn_inner=False,
    scale_attn=False,
    scale_fc=False,
    timm_model_name=None,
    hf_model_name=None,
    hf_tokenizer_name=None,
    tokenizer_mode=None,
    tokenizer_kwargs=None,
    no_causal_mask=False,
    proj_bias=False,
    proj_type="linear",
)
# Keys read but without effect on a CoCa (pool_type: the CLS token is always pooled; the rest
# belong to other towers or to training only).
IGNORED = {
    "pool_type",
    "eos_id",
    "dim_head",
    "n_queries",
    "attn_pooler_heads",
    "custom_text",
    "init_logit_scale",
}
TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg"}
TOP_FIXED = dict(quick_gelu=False, init_logit_bias=None, nonscalar_logit_scale=False)


def _fail(where: str, key: str, value: Any, why: str) -> None:
    raise OpenClipError(f"open_clip {where}.{key}={value!r} is not supported: {why}")


def _read(cfg: dict[str, Any], defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """``cfg`` over ``defaults``; keys we do not reproduce must keep open_clip's defaults."""
    out = dict(defaults)
    for key, value in cfg.items():
        if key in FIXED:
            if value != FIXED[key]:
                _fail(where, key, value, f"only {FIXED[key]!r} is reproduced")
        elif key in defaults:
            out[key] = value
        elif key not in IGNORED:
            _fail(where, key, value, "unknown key")
    return out


def model_fields(
    cfg: dict[str, Any], special_ids: SpecialIds = CLIP_IDS, cls_mask: str = "legacy"
) -> dict[str, Any]:
    """SyCoCa architecture fields reproducing open_clip's ``CoCa(**cfg)``.

    ``special_ids``: the tokenizer's (CLIP's by default). ``cls_mask``: open_clip 3.3.0 builds
    every CoCa text tower with the legacy mask (its ``correct_cls_mask`` is set only by hand).
    """
    for key, value in cfg.items():
        if key in TOP_FIXED:
            if value != TOP_FIXED[key]:
                _fail("config", key, value, f"only {TOP_FIXED[key]!r} is reproduced")
        elif key not in TOP_KEYS and key not in IGNORED:
            _fail("config", key, value, "unknown key")
    vision = _read(cfg.get("vision_cfg", {}), VISION_DEFAULTS, "vision_cfg")
    text = _read(cfg.get("text_cfg", {}), TEXT_DEFAULTS, "text_cfg")
    multimodal = _read(cfg.get("multimodal_cfg", {}), TEXT_DEFAULTS, "multimodal_cfg")
    if not text["embed_cls"]:
        _fail("text_cfg", "embed_cls", False, "a CoCa text tower appends a CLS token")
    if not isinstance(vision["attentional_pool"], bool):
        _fail("vision_cfg", "attentional_pool", vision["attentional_pool"], "only True/False")
    for key in ("width", "heads", "mlp_ratio", "context_length", "vocab_size"):
        if multimodal[key] != text[key]:
            _fail(
                "multimodal_cfg",
                key,
                multimodal[key],
                f"our multimodal decoder shares the text tower's {key} ({text[key]!r})",
            )
    if text["pad_id"] != special_ids.pad:
        _fail("text_cfg", "pad_id", text["pad_id"], f"the tokenizer pads with {special_ids.pad}")
    embed_dim = cfg.get("embed_dim", 512)
    width = vision["width"]
    pooled = vision["attentional_pool"]
    if pooled and text["width"] != embed_dim:
        _fail("text_cfg", "width", text["width"], f"the pooler's width is embed_dim={embed_dim}")
    if not pooled and width != text["width"]:
        _fail("vision_cfg", "width", width, "without a pooler, patch tokens feed the decoder")
    return dict(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        image_width=width,
        image_depth=vision["layers"],
        image_heads=width // vision["head_width"],
        image_mlp_dim=int(width * vision["mlp_ratio"]),
        posemb="learn",
        class_token=True,
        pre_norm=not vision["no_ln_pre"],
        image_final_norm=not pooled,
        patch_embedding_bias=False,
        pooler="single" if pooled else "none",
        pooler_query_norm=pooled,
        caption_queries=vision["attn_pooler_queries"],
        pooler_heads=vision["attn_pooler_heads"],
        vocab_size=text["vocab_size"],
        max_text_len=text["context_length"],
        pad_id=special_ids.pad,
        bos_id=special_ids.bos,
        eos_id=special_ids.eos,
        text_width=text["width"],
        text_depth=text["layers"],
        multimodal_depth=multimodal["layers"],
        text_heads=text["heads"],
        text_mlp_dim=int(text["width"] * text["mlp_ratio"]),
        embed_dim=embed_dim,
        layer_norm_epsilon=1e-5,
        gelu_approximate=False,
        normalize_token_states=False,
        cls_mask=cls_mask,
        layer_layout="open_clip",
    )


def check_open_clip_layout(fields: dict[str, Any]) -> None:
    """Refuse a model whose parameters or function open_clip's CoCa cannot hold."""
    need = dict(
        layer_layout="open_clip",
        class_token=True,
        patch_embedding_bias=False,
        posemb="learn",
        use_captioning=True,
        layer_norm_epsilon=1e-5,
        gelu_approximate=False,
        normalize_token_states=False,
    )
    if fields.get("pooler") == "single":
        need.update(pooler_query_norm=True, image_final_norm=False)
    elif fields.get("pooler") == "none":
        need.update(image_final_norm=True)
    else:
        need["pooler"] = "single or none"
    wrong = {k: fields.get(k) for k, v in need.items() if fields.get(k) != v}
    if fields.get("pooler") == "single" and fields.get("text_width") != fields.get("embed_dim"):
        wrong["embed_dim"] = fields.get("embed_dim")
        need["embed_dim"] = f"text_width ({fields.get('text_width')})"
    if wrong:
        detail = ", ".join(f"{k}={v!r} (needs {need[k]!r})" for k, v in wrong.items())
        raise OpenClipError(f"not an open_clip CoCa layout: {detail}")


def open_clip_config(fields: dict[str, Any]) -> dict[str, Any]:
    """The open_clip model config of a model in its layout (inverse of ``model_fields``)."""
    check_open_clip_layout(fields)
    pooled = fields["pooler"] == "single"
    vision = dict(
        image_size=fields["image_size"],
        layers=fields["image_depth"],
        width=fields["image_width"],
        head_width=fields["image_width"] // fields["image_heads"],
        mlp_ratio=fields["image_mlp_dim"] / fields["image_width"],
        patch_size=fields["patch_size"],
        no_ln_pre=not fields["pre_norm"],
        output_tokens=True,
    )
    if pooled:
        vision.update(
            attentional_pool=True,
            attn_pooler_queries=fields["caption_queries"],
            attn_pooler_heads=fields["pooler_heads"],
        )
    text = dict(
        context_length=fields["max_text_len"],
        vocab_size=fields["vocab_size"],
        width=fields["text_width"],
        heads=fields["text_heads"],
        layers=fields["text_depth"],
        mlp_ratio=fields["text_mlp_dim"] / fields["text_width"],
        embed_cls=True,
        pad_id=fields["pad_id"],
        output_tokens=True,
    )
    multimodal = {k: text[k] for k in ("context_length", "vocab_size", "width", "heads")}
    multimodal.update(layers=fields["multimodal_depth"], mlp_ratio=text["mlp_ratio"])
    return dict(
        embed_dim=fields["embed_dim"],
        vision_cfg=vision,
        text_cfg=text,
        multimodal_cfg=multimodal,
        custom_text=True,
    )
