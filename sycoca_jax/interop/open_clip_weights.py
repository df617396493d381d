"""open_clip CoCa state dicts <-> SyCoCa parameters, exactly (no tensor changes beyond layout).

One table of rules (``rules(model)``) serves both directions: each names open_clip keys, our
parameter paths (in the unrolled layout; scanned models are stacked after / unstacked before)
and the two layout changes between them, written for numpy (the data) and ``jax.numpy`` alike
(``jax.eval_shape`` gives the state dict's shapes without allocating it: ``state_dict_shapes``).
Weights are read with ``safetensors`` only: pickled PyTorch files are refused, never unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax.interop.open_clip_config import (
    OpenClipError,
    OpenClipFileNotFoundError,
    check_open_clip_layout,
)
from sycoca_jax.models import build, convert
from sycoca_jax.models.sycoca import SyCoCa

Arrays = list[Any]  # numpy arrays, or jax tracers under ``jax.eval_shape``
Path = tuple[str, ...]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    'convert it once where torch is installed: python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('IN', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k.removeprefix('module.'): v.contiguous() for k, v in sd.items()}, "
    "'OUT.safetensors')\""
)


class Rule(NamedTuple):
    """open_clip keys <-> our parameter paths; ``load`` maps their arrays to ours, ``save`` back."""

    theirs: tuple[str, ...]
    ours: tuple[Path, ...]
    load: Callable[[Arrays], Arrays]
    save: Callable[[Arrays], Arrays]


def _xp(x: Any) -> Any:
    """The array namespace of ``x``: numpy for data, jax.numpy under tracing."""
    return np if isinstance(x, np.ndarray) else jnp


def _transpose(x: Any) -> Any:
    return x.T


def _one(theirs: str, ours: Path, load=lambda x: x, save=lambda x: x) -> Rule:
    return Rule((theirs,), (ours,), lambda xs: [load(xs[0])], lambda xs: [save(xs[0])])


def _linear(theirs: str, ours: Path) -> list[Rule]:
    """torch Linear (weight (out, in), bias) <-> Dense (kernel (in, out), bias)."""
    return [
        _one(f"{theirs}.weight", ours + ("kernel",), _transpose, _transpose),
        _one(f"{theirs}.bias", ours + ("bias",)),
    ]


def _layer_norm(theirs: str, ours: Path) -> list[Rule]:
    return [_one(f"{theirs}.weight", ours + ("scale",)), _one(f"{theirs}.bias", ours + ("bias",))]


def _attention(theirs: str, ours: Path, heads: int, packed: bool) -> list[Rule]:
    """torch ``nn.MultiheadAttention`` <-> ``layers.MultiHeadAttention``. ``packed``: one
    ``in_proj_weight`` (same width for queries and keys), else ``q/k/v_proj_weight``."""

    def to_heads(w):  # (H*K, D_in) -> (D_in, H, K)
        return w.T.reshape(w.shape[1], heads, -1)

    def from_heads(k):
        return k.reshape(k.shape[0], -1).T

    names = ("query", "key", "value")
    out = [
        Rule(
            (f"{theirs}.in_proj_bias",),
            tuple(ours + (n, "bias") for n in names),
            lambda xs: [b.reshape(heads, -1) for b in _xp(xs[0]).split(xs[0], 3)],
            lambda xs: [_xp(xs[0]).concatenate([b.reshape(-1) for b in xs])],
        ),
        _one(
            f"{theirs}.out_proj.weight",
            ours + ("out", "kernel"),
            lambda w: w.T.reshape(heads, -1, w.shape[0]),
            lambda k: k.reshape(-1, k.shape[-1]).T,
        ),
        _one(f"{theirs}.out_proj.bias", ours + ("out", "bias")),
    ]
    if packed:
        out.append(
            Rule(
                (f"{theirs}.in_proj_weight",),
                tuple(ours + (n, "kernel") for n in names),
                lambda xs: [to_heads(w) for w in _xp(xs[0]).split(xs[0], 3)],
                lambda xs: [_xp(xs[0]).concatenate([from_heads(k) for k in xs])],
            )
        )
    else:
        for short, name in zip("qkv", names, strict=True):
            out.append(
                _one(f"{theirs}.{short}_proj_weight", ours + (name, "kernel"), to_heads, from_heads)
            )
    return out


def _block(theirs: str, ours: Path, heads: int) -> list[Rule]:
    """open_clip ``ResidualAttentionBlock`` <-> the self-attention half of ``layers.Block``."""
    return [
        *_layer_norm(f"{theirs}.ln_1", ours + ("ln_self",)),
        *_attention(f"{theirs}.attn", ours + ("self_attention",), heads, packed=True),
        *_layer_norm(f"{theirs}.ln_2", ours + ("ln_mlp",)),
        *_linear(f"{theirs}.mlp.c_fc", ours + ("mlp", "fc1")),
        *_linear(f"{theirs}.mlp.c_proj", ours + ("mlp", "fc2")),
    ]


def _cross_block(theirs: str, ours: Path, heads: int) -> list[Rule]:
    """open_clip's cross-attention ``ResidualAttentionBlock`` <-> the second half of an
    ``open_clip``-layout ``layers.Block``."""
    return [
        *_layer_norm(f"{theirs}.ln_1", ours + ("ln_cross",)),
        *_layer_norm(f"{theirs}.ln_1_kv", ours + ("ln_context",)),
        *_attention(f"{theirs}.attn", ours + ("cross_attention",), heads, packed=True),
        *_layer_norm(f"{theirs}.ln_2", ours + ("ln_cross_mlp",)),
        *_linear(f"{theirs}.mlp.c_fc", ours + ("cross_mlp", "fc1")),
        *_linear(f"{theirs}.mlp.c_proj", ours + ("cross_mlp", "fc2")),
    ]


def rules(model: SyCoCa) -> list[Rule]:
    """Every open_clip key of ``model``'s CoCa and where it lives in our (unrolled) params."""
    check_open_clip_layout(model_fields_of(model))
    p = model.patch_size

    def conv_load(w):  # (D, C, p, p) -> (p*p*C, D), patches flattened as (y, x, c)
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])

    def conv_save(k):
        return k.reshape(p, p, -1, k.shape[-1]).transpose(3, 2, 0, 1)

    enc = ("image_encoder",)
    out = [
        _one("visual.conv1.weight", enc + ("patch_embedding", "kernel"), conv_load, conv_save),
        _one("visual.class_embedding", enc + ("class_embedding",)),
        _one("visual.positional_embedding", enc + ("posemb", "pos_embedding")),
        _one("visual.proj", ("image_projection", "kernel")),
    ]
    if model.pre_norm:
        out += _layer_norm("visual.ln_pre", enc + ("ln_pre",))
    for i in range(model.image_depth):
        out += _block(
            f"visual.transformer.resblocks.{i}", enc + ("encoder", f"block_{i}"), model.image_heads
        )
    if model.pooler == "single":
        pool = ("caption_pooler",)
        packed = model.image_width == model.text_width
        out += [
            _one("visual.attn_pool.query", pool + ("queries",)),
            *_layer_norm("visual.attn_pool.ln_q", pool + ("ln_queries",)),
            *_layer_norm("visual.attn_pool.ln_k", pool + ("ln_context",)),
            *_attention("visual.attn_pool.attn", pool + ("attention",), model.pooler_heads, packed),
            *_layer_norm("visual.ln_post", pool + ("ln_out",)),
        ]
    else:
        out += _layer_norm("visual.ln_post", enc + ("ln_final",))

    text = ("text_encoder",)
    out += [
        _one("text.token_embedding.weight", text + ("token_embedding", "embedding")),
        _one("text.positional_embedding", text + ("pos_embedding",)),
        _one("text.cls_emb", text + ("cls",)),
        *_layer_norm("text.ln_final", text + ("ln_final",)),
        _one("text.text_projection", ("text_projection", "kernel")),
        _one("logit_scale", ("log_temperature",)),
    ]
    for i in range(model.text_depth):
        out += _block(
            f"text.transformer.resblocks.{i}", text + ("decoder", f"block_{i}"), model.text_heads
        )
    dec = ("multimodal_decoder",)
    for i in range(model.multimodal_depth):
        ours = dec + ("decoder", f"block_{i}")
        out += _block(f"text_decoder.resblocks.{i}", ours, model.text_heads)
        out += _cross_block(f"text_decoder.cross_attn.{i}", ours, model.text_heads)
    out += [
        *_layer_norm("text_decoder.ln_final", dec + ("ln_final",)),
        _one("text_decoder.text_projection", dec + ("logits", "kernel")),
    ]
    return out


def model_fields_of(model: SyCoCa) -> dict[str, Any]:
    names = set(SyCoCa.__dataclass_fields__) - {"parent", "name"}
    return {k: getattr(model, k) for k in names}


# ------------------------------------------------------------------------------ tree helpers
def _get(tree: dict, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flat_paths(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flat_paths(v, prefix + (k,)))
    return out


# ------------------------------------------------------------------------------ conversions
def _listing(names: Sequence[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def to_params(
    state: Mapping[str, np.ndarray], model: SyCoCa, init: Callable[[], Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """open_clip ``state`` -> ``model``'s params (its layout, scanned or not), and the top-level
    parameter subtrees taken from ``init()`` (an initialisation of ``model``) because open_clip
    has no such head (e.g. ``tgmim_decoder``). Missing or unexpected keys, and shape mismatches,
    are errors listing them."""
    table = rules(model)
    expected = {k for rule in table for k in rule.theirs}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise OpenClipError(
            "the weights do not match this open_clip CoCa config: "
            + (f"missing keys: {_listing(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys: {_listing(unexpected)}" if unexpected else "")
        )
    unrolled = build.abstract_params(model.clone(scan=False))
    target = {path: tuple(x.shape) for path, x in flat_paths(unrolled).items()}
    params: dict[str, Any] = {}
    wrong = []
    for rule in table:
        arrays = rule.load([np.asarray(state[k], np.float32) for k in rule.theirs])
        for path, array in zip(rule.ours, arrays, strict=True):
            if tuple(array.shape) != target[path]:
                wrong.append(f"{'/'.join(path)}: {array.shape} vs model {target[path]}")
            _set(params, path, np.array(array, np.float32, order="C"))
    if wrong:
        raise OpenClipError(f"open_clip weights do not fit the model's shapes: {_listing(wrong)}")
    covered = {path for rule in table for path in rule.ours}
    uncovered = [path for path in target if path not in covered]
    new_heads = sorted({path[0] for path in uncovered})
    partial = [n for n in new_heads if n in params]
    if partial:
        raise RuntimeError(f"rules() misses parameters of {partial}")  # a bug, not the input's
    params = convert.to_scanned(params) if model.scan else params
    if new_heads:
        if init is None:
            raise ValueError(f"{new_heads} have no open_clip counterpart and no init was given")
        fresh = init()
        for name in new_heads:
            params[name] = jax.tree.map(np.asarray, fresh[name])
    return params, new_heads


def _saved(params: Mapping[str, Any], model: SyCoCa) -> dict[str, Any]:
    tree = convert.to_unrolled(params)
    state = {}
    for rule in rules(model):
        state.update(zip(rule.theirs, rule.save([_get(tree, p) for p in rule.ours]), strict=True))
    return state


def to_state_dict(params: Mapping[str, Any], model: SyCoCa) -> tuple[dict[str, np.ndarray], list]:
    """``model``'s params -> open_clip's state dict (float32 numpy), and the top-level subtrees
    that open_clip has no place for (dropped, e.g. ``tgmim_decoder``)."""
    arrays = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    state = {k: np.array(v, np.float32, order="C") for k, v in _saved(arrays, model).items()}
    used = {path[0] for rule in rules(model) for path in rule.ours}
    return state, sorted(set(params) - used)


def state_dict_shapes(model: SyCoCa) -> dict[str, tuple[int, ...]]:
    """The shapes of ``model``'s open_clip state dict, computed without allocating it."""
    abstract = build.abstract_params(model)
    shapes = jax.eval_shape(lambda p: _saved(p, model), abstract)
    return {k: tuple(v.shape) for k, v in shapes.items()}


# ------------------------------------------------------------------------------ files
def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """float32 arrays of a ``.safetensors`` file; pickled PyTorch files are refused."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise OpenClipFileNotFoundError(f"no weights file at {path!r}")
    kind = _file_kind(path)
    if kind == "pickle" or path.lower().endswith(PICKLE_SUFFIXES):
        raise OpenClipError(
            f"{path} is a pickled PyTorch file, which is never unpickled here; "
            + CONVERT_HINT.replace("IN", path)
        )
    if kind != "safetensors":
        raise OpenClipError(f"{path} is not a .safetensors file (its header does not parse)")
    out = {}
    with safe_open(path, framework="flax") as f:
        for key in f.keys():
            out[key] = np.asarray(f.get_tensor(key), np.float32)
    return out


def _file_kind(path: str) -> str:
    """``safetensors`` (an 8-byte header length, then a JSON header), ``pickle`` (torch.save
    writes a zip archive, older files a bare pickle stream) or ``unknown``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def write_safetensors(state: Mapping[str, np.ndarray], path: str, metadata: dict | None = None):
    from safetensors.numpy import save_file

    save_file(dict(state), path, metadata={"format": "pt", **(metadata or {})})
