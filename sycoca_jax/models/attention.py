"""Softmax attention and its kernels: XLA everywhere, cuDNN flash attention on GPUs, Pallas splash
attention on TPUs, chosen per call by ``implementation="auto"``.

Masks are structured (``AttentionMask``: causal and/or a key-validity vector) so each kernel can
be told what it supports natively (cuDNN's causal mask, splash's causal mask and segment ids)
instead of reading a dense (B, H, T, S) array. The KV-cache decode path builds dense masks; those
always take the XLA path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn
from flax import struct
from jax.sharding import PartitionSpec

Array = jax.Array

NEG_INF = -1e9  # large finite negative: keeps fully-masked rows finite (they never occur by design)
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "jax")
# The name splash attention gives the residuals its backward pass reads (output, log-sum-exp), so a
# remat policy can keep them (remat.save_dots_and).
ATTENTION_RESIDUALS = "attention_residuals"
SPLASH_BLOCK = 128  # splash attention's tile along both sequences (TPU lanes)
_QKV_AXES = ("act_batch", None, "heads", None)  # (B, T, H, D) activations


@struct.dataclass
class AttentionMask:
    """Which keys each query may see: causal (key j <= query i) and/or only the keys where
    ``key_valid`` (B, S) is True. Empty: every key."""

    key_valid: Array | None = None
    causal: bool = struct.field(pytree_node=False, default=False)

    def dense(self, q_len: int, kv_len: int) -> Array | None:
        """As a boolean array broadcastable to (B, H, T, S), True = attend; None if empty."""
        mask = None
        if self.causal:
            mask = causal_mask(q_len)[None, None] if q_len == kv_len else None
            if mask is None:
                raise ValueError(f"a causal mask needs equal lengths, got {q_len} and {kv_len}")
        if self.key_valid is not None:
            keys = self.key_valid[:, None, None, :]
            mask = keys if mask is None else mask & keys
        return mask


def causal_mask(length: int) -> Array:
    """(length, length) boolean mask, True where query i may attend to key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))


def key_padding_mask(valid: Array) -> AttentionMask:
    """(B, S) validity of keys -> a mask that hides the invalid keys from every query."""
    return AttentionMask(key_valid=valid)


Mask = AttentionMask | Array | None


def _dense(mask: Mask, q_len: int, kv_len: int) -> Array | None:
    return mask.dense(q_len, kv_len) if isinstance(mask, AttentionMask) else mask


# ------------------------------------------------------------------------------------- choice
def _platform() -> str:
    """The platform the program is compiled for: the devices of the mesh in context (so a CPU
    host compiling for a TPU slice, ``tools.compile_for``, says tpu), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return jax.default_backend() if device is None else device.platform


def _cudnn_supports(query: Array, key: Array, mask: Mask) -> bool:
    """cuDNN flash attention's limits (jax's check_is_flash_attention): bf16/fp16, head dim a
    multiple of 8 up to 128, and even lengths. jax 0.11 checks the lengths again inside the
    gradient's forward rule, where a refusal can no longer fall back to XLA (seen on an H200:
    "Unsupported sequence length Q 49, KV 49" while differentiating ViT-B/32's 49 patches), so
    ``auto`` leaves odd lengths to XLA. An explicit ``cudnn`` pads them to even
    (``pad_to_even``); ``auto`` will too once that is measured on a GPU."""
    if isinstance(mask, jax.Array) or query.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    depth = query.shape[-1]
    if depth % 8 or depth > 128:
        return False
    return not (query.shape[1] % 2 or key.shape[1] % 2)


def _splash_supports(query: Array, key: Array, mask: Mask) -> bool:
    """Splash attention without padding: both lengths whole tiles (it runs on others too, padded,
    when asked for by name; for short sequences XLA's fused attention is as fast)."""
    if isinstance(mask, jax.Array):
        return False
    return query.shape[1] % SPLASH_BLOCK == 0 and key.shape[1] % SPLASH_BLOCK == 0


def choose(implementation: str, query: Array, key: Array, mask: Mask) -> str:
    """The implementation a call uses: ``auto`` picks cuDNN on GPUs and splash on TPUs where the
    shapes and mask allow, XLA otherwise. Dense masks (the decode cache) always use XLA."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention_impl must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}"
        )
    if isinstance(mask, jax.Array) and implementation in ("cudnn", "splash"):
        return "xla"
    if implementation != "auto":
        return implementation
    platform = _platform()
    if platform == "gpu" and _cudnn_supports(query, key, mask):
        return "cudnn"
    if platform == "tpu" and _splash_supports(query, key, mask):
        return "splash"
    return "xla"


# ------------------------------------------------------------------------------ implementations
def _xla(query: Array, key: Array, value: Array, mask: Array | None) -> Array:
    """Einsums with the softmax in float32."""
    depth = query.shape[-1]
    logits = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(depth))
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, value)


def _pad_length(x: Array, n: int) -> Array:
    """``n`` zero positions appended along axis 1 (the sequence axis of (B, L, ...))."""
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2)) if n else x


def _hide_padded_keys(mask: Mask, batch: int, kv_len: int, n: int) -> Mask:
    """The mask for keys padded by ``n`` positions at the end: the causal mask already hides
    them (they come after every real query); otherwise the key-validity vector marks them."""
    causal = isinstance(mask, AttentionMask) and mask.causal
    key_valid = mask.key_valid if isinstance(mask, AttentionMask) else None
    if not n or (causal and key_valid is None):
        return mask
    if key_valid is None:
        key_valid = jnp.ones((batch, kv_len), bool)
    return AttentionMask(key_valid=jnp.pad(key_valid, ((0, 0), (0, n))), causal=causal)


def pad_to_even(
    query: Array, key: Array, value: Array, mask: Mask
) -> tuple[Array, Array, Array, Mask]:
    """Pad odd query/key lengths by one position, which cuDNN's flash attention refuses (jax
    0.11 on an H200: "Unsupported sequence length Q 49, KV 49"). A padded key is hidden from every
    query: by the causal mask where there is one (it comes after every real query), else by a
    key-validity mask. A padded query's row is the caller's to drop (``out[:, :T]``)."""
    pad_t, pad_s = query.shape[1] % 2, key.shape[1] % 2
    if not (pad_t or pad_s):
        return query, key, value, mask
    mask = _hide_padded_keys(mask, key.shape[0], key.shape[1], pad_s)
    key, value = _pad_length(key, pad_s), _pad_length(value, pad_s)
    return _pad_length(query, pad_t), key, value, mask


def pad_stack_to_even(
    x: Array, mask: Mask, context: Array | None = None, context_mask: Mask = None
) -> tuple[Array, Mask, Array | None, Mask]:
    """``pad_to_even`` once for a whole stack of layers instead of in every attention call:
    the token sequence ``x`` (B, T, D) and the cross-attention ``context`` (B, S, D) get one
    zero position each if odd, and their masks hide it as a key. Every layer then hands cuDNN
    even lengths, so no layer pads its queries, keys and values and slices its output again
    (13 GB of padding kernels per B/32 step compiled for an H200, 6 GB of it extra traffic).
    Padded rows stay in their own positions
    (MLPs and LayerNorms work per token; no real query sees them), so the caller drops
    ``x[:, T:]`` at the end. Dense masks (the decode cache) are left alone."""
    if isinstance(mask, jax.Array) or isinstance(context_mask, jax.Array):
        return x, mask, context, context_mask
    pad_t = x.shape[1] % 2
    mask = _hide_padded_keys(mask, x.shape[0], x.shape[1], pad_t)
    x = _pad_length(x, pad_t)
    if context is not None and context.shape[1] % 2:
        context_mask = _hide_padded_keys(context_mask, context.shape[0], context.shape[1], 1)
        context = _pad_length(context, 1)
    return x, mask, context, context_mask


def _cudnn(query: Array, key: Array, value: Array, mask: Mask) -> Array:
    """cuDNN's fused kernel: its own causal mask (skipping the masked blocks), padding as a bias,
    odd lengths padded to even (``pad_to_even``; a layer stack has already padded its own,
    ``pad_stack_to_even``, so only single calls such as the poolers pad here)."""
    length = query.shape[1]
    query, key, value, mask = pad_to_even(query, key, value, mask)
    # jax partitions the cuDNN call only when query, key and value share one sharding. Compiled
    # for 8 GPUs with FSDP, the attentional pooler's learned queries (broadcast over the batch)
    # and the multimodal decoder's cross-attention came in unsplit beside batch-split keys:
    # "Query, key and value should have same sharding". Batch over data×fsdp, heads as the
    # rules say; no-ops outside a mesh.
    query, key, value = (nn.with_logical_constraint(x, _QKV_AXES) for x in (query, key, value))
    causal = isinstance(mask, AttentionMask) and mask.causal
    padding = None
    if isinstance(mask, AttentionMask) and mask.key_valid is not None:
        # cuDNN takes the mask as a bias of the full (query, key) shape: "Bias must have same
        # seq length as QKV" refused (b, 1, 1, S) on jax 0.11.
        b, t, s = query.shape[0], query.shape[1], key.shape[1]
        padding = jnp.broadcast_to(mask.key_valid[:, None, None, :], (b, 1, t, s))
        padding = nn.with_logical_constraint(padding, ("act_batch", None, None, None))
    out = jax.nn.dot_product_attention(
        query, key, value, mask=padding, is_causal=causal, implementation="cudnn"
    )
    return out[:, :length]


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def _splash_local(query, key, value, key_valid, *, causal: bool, interpret: bool):
    """Splash attention on one device's shard: (b, T, h, D) in, out; lengths padded to whole
    tiles, padded keys hidden with segment ids."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, d = query.shape
    s = key.shape[1]
    tp, sp = _round_up(t, SPLASH_BLOCK), _round_up(s, SPLASH_BLOCK)
    scale = 1.0 / math.sqrt(d)

    def heads_first(x, length):  # (b, L, h, D) -> (b, h, L_padded, D)
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    q = heads_first(query * jnp.asarray(scale, query.dtype), tp)
    k, v = heads_first(key, sp), heads_first(value, sp)
    valid = jnp.ones((b, s), bool) if key_valid is None else key_valid
    kv_ids = jnp.pad(valid, ((0, 0), (0, sp - s))).astype(jnp.int32)
    segment_ids = splash.SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=kv_ids)
    shape = (tp, sp)
    head_mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    block = min(SPLASH_BLOCK, tp, sp)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([head_mask] * h),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
        residual_checkpoint_name=ATTENTION_RESIDUALS,
    )
    out = jax.vmap(kernel)(q, k, v, segment_ids)  # (b, h, T_padded, D)
    return out[:, :, :t].transpose(0, 2, 1, 3)


def _splash(query: Array, key: Array, value: Array, mask: Mask, interpret: bool) -> Array:
    """Splash attention, one kernel per device over its share of the batch (and of the heads
    where the rules split heads over ``tensor``): a Pallas kernel is not partitioned by XLA."""
    causal = isinstance(mask, AttentionMask) and mask.causal
    key_valid = mask.key_valid if isinstance(mask, AttentionMask) else None
    local = functools.partial(_splash_local, causal=causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(query, key, value, key_valid)
    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(("act_batch", None, "heads", None))

    def fits(axes, size):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return axes if names and size % math.prod(mesh.shape[a] for a in names) == 0 else None

    batch_axes = fits(batch_axes, query.shape[0])
    head_axes = fits(head_axes, query.shape[2])
    qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
    valid_spec = PartitionSpec(batch_axes, None)
    if key_valid is None:
        key_valid = jnp.ones(key.shape[:2], bool)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, valid_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )
    return run(query, key, value, key_valid)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Mask,
    implementation: str = "xla",
    *,
    interpret: bool = False,
) -> Array:
    """Softmax attention. q (B,T,H,D), k/v (B,S,H,D); ``mask`` an ``AttentionMask``, a boolean
    array broadcastable to (B,H,T,S) (True = keep), or None. ``implementation``: ``auto`` (see
    ``choose``), ``xla`` (einsums, softmax in float32), ``cudnn`` (GPU flash attention),
    ``splash`` (TPU Pallas kernel; interpreted off TPU, or with ``interpret=True``), or
    ``jax`` (``jax.nn.dot_product_attention``'s default)."""
    chosen = choose(implementation, query, key, mask)
    if chosen == "cudnn":
        try:
            return _cudnn(query, key, value, mask)
        except (NotImplementedError, ValueError, RuntimeError) as e:
            if implementation != "auto":
                raise
            # jax checks cuDNN's limits (its version, the GPU, the shapes) while tracing; under
            # ``auto`` a refusal falls back to XLA for this call instead of failing the run.
            logging.warning("cuDNN attention refused %s: %s; using XLA", query.shape, e)
            chosen = "xla"
    if chosen == "splash":  # interpreted (slowly, exactly) off TPU: for tests on CPU
        return _splash(query, key, value, mask, interpret or _platform() != "tpu")
    dense = _dense(mask, query.shape[1], key.shape[1])
    if chosen == "jax":
        return jax.nn.dot_product_attention(query, key, value, mask=dense)
    return _xla(query, key, value, dense)
