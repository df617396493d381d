"""The open_clip model options: defaults keep our parameter trees; the legacy CLS mask; a class
token is never a maskable patch, is always encoded when a branch re-encodes a subset, and stays
out of the relevance scores and the TG-MIM decoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sycoca_jax.models import masking, text, vit
from sycoca_jax.models.sycoca import SyCoCa
from tests.helpers import random_tokens
from tests.interop import golden


def test_default_parameter_trees_are_unchanged(tiny_params):
    """Checkpoints written before the options existed still load: no new parameter appears in
    the default layout, and the fused block keeps its names."""
    assert set(tiny_params["image_encoder"]) == {"patch_embedding", "posemb", "encoder", "ln_final"}
    assert set(tiny_params["image_encoder"]["patch_embedding"]) == {"kernel", "bias"}
    assert set(tiny_params["caption_pooler"]) == {"queries", "ln_context", "attention", "ln_out"}
    block = tiny_params["multimodal_decoder"]["decoder"]["block_0"]
    assert set(block) == {
        "ln_self",
        "self_attention",
        "ln_cross",
        "cross_attention",
        "ln_mlp",
        "mlp",
    }
    assert set(tiny_params["multimodal_decoder"]["logits"]) == {"kernel", "bias"}
    assert set(tiny_params["text_encoder"]["decoder"]["block_0"]) == {
        "ln_self",
        "self_attention",
        "ln_mlp",
        "mlp",
    }


def test_open_clip_layer_layout_has_two_blocks_per_layer():
    params = _random_params(SyCoCa(**golden.fields("single")))
    block = params["multimodal_decoder"]["decoder"]["block_0"]
    assert set(block) == {
        "ln_self",
        "self_attention",
        "ln_mlp",
        "mlp",
        "ln_cross",
        "ln_context",
        "cross_attention",
        "ln_cross_mlp",
        "cross_mlp",
    }
    assert set(params["multimodal_decoder"]["logits"]) == {"kernel"}
    assert {"class_embedding", "ln_pre"} <= set(params["image_encoder"])
    assert "ln_final" not in params["image_encoder"]  # open_clip's ln_post follows the pooler
    assert "ln_queries" in params["caption_pooler"]


def test_legacy_cls_mask_is_the_corrected_one_shifted():
    valid = jnp.array([[True, True, True, False, False]])  # 3 tokens, 2 pads, then CLS
    causal = np.tril(np.ones((6, 6), bool))
    corrected = causal & np.array([1, 1, 1, 0, 0, 1], bool)
    legacy = causal & np.array([1, 1, 1, 1, 0, 0], bool)  # first pad seen, CLS blind to itself
    dense = text.unimodal_attention_mask(valid).dense(6, 6)
    np.testing.assert_array_equal(dense[0, 0], corrected)
    np.testing.assert_array_equal(
        text.unimodal_attention_mask(valid, "legacy").dense(6, 6)[0, 0], legacy
    )
    with pytest.raises(ValueError, match="cls_mask"):
        text.unimodal_attention_mask(valid, "shifted")


def test_class_token_is_kept_whatever_patches_are_encoded():
    encoder = vit.ViT(
        image_size=16, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32,
        class_token=True, pre_norm=True,
    )  # fmt: skip
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    params = _random_params(encoder, images)
    # All patches in another order: attention is order-free, so every patch keeps its own state
    # (it carries its own position embedding) and the class token is unchanged.
    order = np.stack([np.random.default_rng(i).permutation(16) for i in range(2)])

    @jax.jit  # one compilation: quicker than three op-by-op runs
    def encodings(p):
        run = functools.partial(encoder.apply, {"params": p}, images)
        return run(), run(jnp.asarray(order)), run(jnp.asarray(order[:, :5]))

    full, shuffled, subset = encodings(params)
    assert full.shape == (2, 1 + 16, 16)
    np.testing.assert_allclose(shuffled[:, 0], full[:, 0], atol=1e-5)
    np.testing.assert_allclose(shuffled[:, 1:], vit.gather_tokens(full[:, 1:], order), atol=1e-5)
    assert subset.shape == (2, 1 + 5, 16)


def _random_params(model: nn.Module, *inputs: jax.Array):
    """Parameters of the model's shapes, drawn with NumPy (N(0, 0.2)): these tests compare
    layouts and forward paths, not initial values, and compiling ``model.init`` (its random
    initialisers) costs more here than the forward itself. SyCoCa's inputs by default."""
    if not inputs:
        inputs = (
            jnp.zeros((2, model.image_size, model.image_size, 3), jnp.float32),
            jnp.zeros((2, model.max_text_len + 1), jnp.int32),
        )
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(rngs, *inputs)["params"]))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)


TGMIM_HEAD = dict(decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


@pytest.mark.parametrize("name,branch", [("single", "reencode"), ("no_pooler", "reuse")])
def test_masking_with_a_class_token_covers_patches_only(name, branch):
    """SyCoCa's forward with a class token: relevance, caption indices and TG-MIM masks cover
    the N patches; the captioning branch sees the class token plus the kept patches (re-encoded,
    or gathered from the full encoding), exactly as the inference methods compose them."""
    fields = golden.fields(
        name,
        use_tgmim=True,
        caption_masking="attentive",
        tgmim_masking="attentive",
        branch_encoding=branch,
        **TGMIM_HEAD,
    )
    model = SyCoCa(**fields)
    params = _random_params(model)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, model.image_size, model.image_size, 3)), jnp.float32)
    tokens = random_tokens(rng, 2, model.max_text_len, model.vocab_size)
    tokens = np.select([tokens == 1, tokens == 2], [model.bos_id, model.eos_id], tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    n = model.num_patches

    def reference(m: SyCoCa, index: jax.Array):
        """The inference methods composed by hand, on the forward's caption indices."""
        states = m.image_encoder(images)
        patches = states[:, 1:]
        text_states, _ = m.text_encoder(tokens[:, :-1])
        relevance = masking.relevance_scores(
            m.patch_embeddings(patches),
            m.text_projection(text_states),
            tokens[:, :-1] != m.pad_id,
            m.score_mode,
            m.temperature(),
        )
        if branch == "reencode":
            kept = m.image_encoder(images, index)
        else:
            kept = jnp.concatenate([states[:, :1], vit.gather_tokens(patches, index)], axis=1)
        logits, _ = m.caption_logits(m.image_tokens(kept), tokens)
        return relevance, logits

    @jax.jit  # one compilation: quicker than running both op by op
    def forward_and_reference(p):
        out = model.apply({"params": p}, images, tokens, rngs={"masking": jax.random.key(2)})
        return out, model.apply({"params": p}, out["caption_indices"], method=reference)

    out, (relevance, logits) = forward_and_reference(params)
    assert out["relevance"].shape == (2, n)
    keep = masking.static_count(n, model.caption_keep_ratio, "keep")
    masked = masking.static_count(n, model.tgmim_mask_ratio, "mask")
    assert out["caption_indices"].shape == (2, keep) and int(out["caption_indices"].max()) < n
    assert out["tgmim_mask"].shape == (2, n)
    np.testing.assert_array_equal(np.asarray(out["tgmim_mask"]).sum(axis=1), [masked, masked])
    assert out["tgmim_prediction"].shape == (2, n, model.patch_size**2 * 3)
    np.testing.assert_allclose(out["relevance"], relevance, atol=1e-6)
    np.testing.assert_allclose(out["caption_logits"], logits, atol=1e-5)
    # The most relevant patches are the ones kept for captioning and hidden from TG-MIM.
    best = np.argsort(-np.asarray(relevance), axis=1, kind="stable")
    np.testing.assert_array_equal(np.sort(out["caption_indices"]), np.sort(best[:, :keep]))
    hidden = np.zeros((2, n), bool)
    np.put_along_axis(hidden, best[:, :masked], True, axis=1)
    np.testing.assert_array_equal(out["tgmim_mask"], hidden)


def test_pooler_none_needs_a_class_token_and_matching_widths():
    with pytest.raises(ValueError, match="class_token=True and image_width == text_width"):
        _random_params(SyCoCa(**golden.fields("no_pooler", class_token=False)))
    with pytest.raises(ValueError, match="layer_layout"):
        _random_params(SyCoCa(**golden.fields("single", layer_layout="split")))
