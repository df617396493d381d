"""Attention implementations: every path that runs on CPU (``jax``; TPU ``splash`` interpreted)
equals the XLA path with causal, padding, causal+padding and cross-attention masks, sharded
too; ``auto`` picks the kernel each platform supports; a whole model and its KV-cache decoding
give the same numbers whichever implementation is configured."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sycoca_jax import sharding
from sycoca_jax.models import attention, layers
from sycoca_jax.models.attention import AttentionMask
from tests.models.test_decoding_cache import _decode


def _qkv(b=2, t=20, s=20, h=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    return q, k, v


def _valid(b, s, seed=1):
    """Right-padded keys, plus one valid key after the padding (the text encoder's CLS)."""
    lengths = np.random.default_rng(seed).integers(3, s - 2, b)
    valid = np.arange(s)[None, :] < lengths[:, None]
    valid[:, -1] = True
    return jnp.asarray(valid)


MASKS = {
    "none": lambda b, t, s: None,
    "causal": lambda b, t, s: AttentionMask(causal=True),
    "padding": lambda b, t, s: AttentionMask(key_valid=_valid(b, s)),
    "causal_padding": lambda b, t, s: AttentionMask(key_valid=_valid(b, s), causal=True),
}


def _reference(q, k, v, mask):
    """NumPy softmax attention, independent of the module under test."""
    d = q.shape[-1]
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    if mask is not None:
        logits = np.where(np.asarray(mask.dense(q.shape[1], k.shape[1])), logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("implementation", ["xla", "jax", "splash"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_self_attention_paths_equal_the_reference(implementation, mask_name):
    q, k, v = _qkv()
    mask = MASKS[mask_name](2, 20, 20)
    out = attention.dot_product_attention(q, k, v, mask, implementation)
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=2e-5)


@pytest.mark.parametrize("implementation", ["jax", "splash"])
@pytest.mark.parametrize("mask_name", ["none", "padding"])
def test_cross_attention_paths_equal_xla(implementation, mask_name):
    """Poolers (queries over patches) and TG-MIM (patches over caption tokens): T != S."""
    q, k, v = _qkv(t=7, s=23, seed=2)
    mask = MASKS[mask_name](2, 7, 23)
    out = attention.dot_product_attention(q, k, v, mask, implementation)
    np.testing.assert_allclose(out, attention.dot_product_attention(q, k, v, mask), atol=2e-5)


def test_splash_gradients_equal_xla():
    q, k, v = _qkv(seed=3)
    mask = MASKS["causal_padding"](2, 20, 20)

    def loss(implementation):
        def f(q, k, v):
            out = attention.dot_product_attention(q, k, v, mask, implementation)
            return jnp.sum(out * jnp.cos(out))

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(loss("splash"), loss("xla"), strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_splash_under_a_mesh_runs_per_shard_and_equals_xla():
    """Batch over data×fsdp and heads over tensor: one kernel per device (shard_map)."""
    mesh = sharding.make_mesh((2, 2, 2))
    q, k, v = _qkv(b=4, h=4, seed=4)
    mask = MASKS["causal_padding"](4, 20, 20)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    q, k, v = (jax.device_put(x, spec) for x in (q, k, v))

    def run(implementation):
        fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, implementation))
        with sharding.model_context(mesh, sharding.fsdp_tensor_rules()):
            return fn(q, k, v)

    np.testing.assert_allclose(run("splash"), run("xla"), atol=2e-5)


@pytest.mark.parametrize(
    "platform, dtype, t, s, mask_name, expected",
    [
        ("cpu", jnp.bfloat16, 128, 128, "causal", "xla"),
        ("gpu", jnp.bfloat16, 76, 76, "causal", "cudnn"),  # multimodal decoder
        ("gpu", jnp.bfloat16, 77, 77, "causal_padding", "xla"),  # odd length with a bias
        ("gpu", jnp.bfloat16, 76, 76, "causal_padding", "cudnn"),
        ("gpu", jnp.float32, 76, 76, "causal", "xla"),  # cuDNN needs bf16/fp16
        # ViT-B/32's 49 patches: jax 0.11 refuses odd lengths inside the gradient (H200)
        ("gpu", jnp.bfloat16, 49, 49, "none", "xla"),
        ("gpu", jnp.bfloat16, 256, 49, "none", "xla"),  # pooler over B/32 patches
        ("gpu", jnp.bfloat16, 196, 196, "none", "cudnn"),  # ViT-B/16
        ("tpu", jnp.bfloat16, 256, 256, "causal_padding", "splash"),
        ("tpu", jnp.bfloat16, 197, 197, "none", "xla"),  # not whole tiles: XLA
    ],
)
def test_auto_picks_what_the_platform_supports(
    monkeypatch, platform, dtype, t, s, mask_name, expected
):
    monkeypatch.setattr(attention, "_platform", lambda: platform)
    q = jax.ShapeDtypeStruct((2, t, 8, 64), dtype)
    k = jax.ShapeDtypeStruct((2, s, 8, 64), dtype)
    assert attention.choose("auto", q, k, MASKS[mask_name](2, t, s)) == expected


def _through_padding(q, k, v, mask):
    """What ``_cudnn`` computes, with XLA standing in for the cuDNN kernel (absent here)."""
    t = q.shape[1]
    pq, pk, pv, pmask = attention.pad_to_even(q, k, v, mask)
    assert pq.shape[1] % 2 == 0 and pk.shape[1] % 2 == 0
    return attention.dot_product_attention(pq, pk, pv, pmask, "xla")[:, :t]


@pytest.mark.parametrize(
    "t, s, mask_name",
    [
        (49, 49, "none"),  # ViT-B/32 patches
        (77, 77, "causal"),  # text encoder: 76 tokens + CLS
        (77, 77, "causal_padding"),
        (76, 255, "none"),  # multimodal decoder over the caption-pooler tokens
        (49, 77, "padding"),  # TG-MIM: patches over caption tokens
        (20, 20, "causal_padding"),  # even: untouched
    ],
)
def test_padding_odd_lengths_to_even_leaves_outputs_and_gradients_unchanged(t, s, mask_name):
    q, k, v = _qkv(t=t, s=s, seed=5)
    mask = MASKS[mask_name](2, t, s)
    if t % 2 == 0 and s % 2 == 0:
        assert attention.pad_to_even(q, k, v, mask)[0] is q
    np.testing.assert_allclose(
        _through_padding(q, k, v, mask), _reference(q, k, v, mask), atol=2e-5
    )

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v, mask)
            return jnp.sum(out * jnp.cos(out))

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    plain = lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, "xla")  # noqa: E731
    for got, want in zip(loss(_through_padding), loss(plain), strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)


def _cudnn_stand_in(lengths: list):
    """XLA in the cuDNN kernel's place (absent on CPU), noting the lengths each call receives."""

    def call(q, k, v, mask):
        lengths.append((q.shape[1], k.shape[1]))
        return _through_padding(q, k, v, mask)

    return call


STACKS = {  # (stack options, token length, context length, mask, context mask)
    "image_tower": (dict(), 7, None, "none", None),
    "text_tower_scanned": (dict(scan=True), 9, None, "causal_padding", None),
    "multimodal_open_clip": (dict(cross_attention=True, layout="open_clip"), 6, 7, "causal", None),
    "tgmim_decoder_scanned": (dict(cross_attention=True, scan=True), 9, 7, "none", "padding"),
    "even": (dict(cross_attention=True), 6, 8, "causal", None),
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_cudnn_stack_pads_once_and_computes_what_xla_does(monkeypatch, stack):
    """With cuDNN attention a layer stack pads odd lengths once (``pad_stack_to_even``), so
    every attention call in it receives even lengths and pads nothing; outputs and gradients
    (parameters, tokens, context) equal the XLA stack's. Before, each call padded its own
    queries, keys and values."""
    options, t, s, mask_name, context_mask_name = STACKS[stack]
    lengths: list = []
    monkeypatch.setattr(attention, "_cudnn", _cudnn_stand_in(lengths))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, t, 16)), jnp.float32)
    context = None if s is None else jnp.asarray(rng.normal(size=(2, s, 16)), jnp.float32)
    mask = MASKS[mask_name](2, t, t)
    context_mask = None if context_mask_name is None else MASKS[context_mask_name](2, t, s)

    def stack_with(implementation):
        return layers.BlockStack(
            depth=2, num_heads=2, mlp_dim=32, attention_impl=implementation, **options
        )

    params = stack_with("xla").init(jax.random.key(0), x, mask, context, context_mask)

    def grads(implementation):
        def loss(params, x, context):
            out = stack_with(implementation).apply(params, x, mask, context, context_mask)
            return jnp.sum(out * jnp.cos(out)), out

        argnums = (0, 1) if context is None else (0, 1, 2)
        return jax.grad(loss, argnums=argnums, has_aux=True)(params, x, context)

    (want_grads, want), (got_grads, got) = grads("xla"), grads("cudnn")
    assert got.shape == x.shape
    assert lengths and all(q % 2 == 0 and k % 2 == 0 for q, k in lengths), lengths
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_auto_falls_back_to_xla_when_cudnn_refuses_while_tracing(monkeypatch):
    """On this CPU the cuDNN call itself refuses (no cuDNN): ``auto`` computes with XLA instead,
    an explicit ``cudnn`` raises."""
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(t=16, s=16))
    mask = AttentionMask(causal=True)
    assert attention.choose("auto", q, k, mask) == "cudnn"
    out = attention.dot_product_attention(q, k, v, mask, "auto")
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(attention.dot_product_attention(q, k, v, mask, "xla"), np.float32),
        atol=1e-2,
    )
    with pytest.raises((NotImplementedError, ValueError, RuntimeError)):
        attention.dot_product_attention(q, k, v, mask, "cudnn")


def test_dense_masks_take_the_xla_path_and_bad_names_fail(monkeypatch):
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    q = jax.ShapeDtypeStruct((1, 1, 8, 64), jnp.bfloat16)
    dense = jnp.ones((1, 1, 1, 76), bool)  # the KV-cache decode step
    assert attention.choose("cudnn", q, q, dense) == "xla"
    assert attention.choose("auto", q, q, dense) == "xla"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attention.choose("flash", q, q, None)


def _teacher_forced(model, images, tokens):
    image_tokens = model.encode_image(images)["image_tokens"]
    return image_tokens, model.caption_logits(image_tokens, tokens)[0]


def test_whole_model_and_decode_cache_equal_xla(tiny_model, tiny_params, tiny_inputs):
    """Every attention of the tiny model (towers, poolers, TG-MIM, both text decoders) through
    splash attention gives the same training outputs; KV-cache decoding (dense masks)
    gives the teacher-forced logits."""
    images, tokens = tiny_inputs
    rngs = {"masking": jax.random.key(0)}
    other = tiny_model.clone(attention_impl="splash")  # interpreted on CPU

    def forward(model):
        return jax.jit(lambda p: model.apply({"params": p}, images, tokens, rngs=rngs))

    want, got = forward(tiny_model)(tiny_params), forward(other)(tiny_params)
    for key in ("image_embedding", "text_embedding", "caption_logits", "tgmim_prediction"):
        np.testing.assert_allclose(got[key], want[key], atol=2e-4, rtol=2e-4, err_msg=key)

    image_tokens, teacher = jax.jit(
        lambda p: tiny_model.apply({"params": p}, images, tokens, method=_teacher_forced)
    )(tiny_params)
    text_input = tokens[:, :-1]
    decoded = _decode(other, tiny_params, image_tokens, text_input, [1, 1, 3])
    # Positions before each caption's first pad: the cached steps see what the full pass sees.
    valid = np.cumprod(np.asarray(text_input[:, :5]) != 0, axis=1).astype(bool)
    np.testing.assert_allclose(
        np.asarray(decoded)[valid], np.asarray(teacher[:, :5])[valid], atol=2e-4, rtol=2e-4
    )
