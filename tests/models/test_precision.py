"""bfloat16 compute stays close to float32 on the same (float32) parameters.

Stated tolerance, on the tiny model: embeddings within cosine 0.995 of float32, caption logits
and pixel predictions within 5% of the float32 values' scale (max |Δ| / max |ref|), and the
same attentive-masking choices for at least 90% of patches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sycoca_jax.models import build


def test_bfloat16_matches_float32(tiny_model_config, tiny_params, tiny_inputs):
    images, tokens = tiny_inputs
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        m = tiny_model_config.copy_and_resolve_references()
        m.dtype = dtype
        model = build.from_config(m)
        run = jax.jit(
            lambda p, model=model: model.apply(
                {"params": p}, images, tokens, rngs={"masking": jax.random.key(0)}
            )
        )
        outputs[dtype] = jax.tree.map(np.asarray, run(tiny_params))
    ref, low = outputs["float32"], outputs["bfloat16"]
    assert low["caption_logits"].dtype == jnp.bfloat16
    for key in ("image_embedding", "text_embedding"):
        assert low[key].dtype == np.float32
        cos = np.sum(ref[key] * low[key], axis=-1)
        assert cos.min() > 0.995, (key, cos)
    for key in ("caption_logits", "tgmim_prediction"):
        err = np.abs(low[key].astype(np.float32) - ref[key]).max() / np.abs(ref[key]).max()
        assert err < 0.05, (key, err)
    same = np.mean(np.asarray(low["tgmim_mask"]) == np.asarray(ref["tgmim_mask"]))
    assert same > 0.9, same
    assert np.allclose(low["temperature"], ref["temperature"])
