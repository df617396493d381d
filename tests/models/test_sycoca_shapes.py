"""Output shapes of every entry point, parameter counts, and the three objective presets."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sycoca_jax.models import build, sycoca
from tests.helpers import config_for


def _entry_point_shapes(model: sycoca.SyCoCa, batch: int = 2) -> dict[str, dict]:
    images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), np.float32)
    tokens = jax.ShapeDtypeStruct((batch, model.max_text_len + 1), np.int32)
    params = build.abstract_params(model)
    rngs = {"masking": jax.random.key(0)}

    def shapes(tree):
        return {k: tuple(x.shape) for k, x in tree.items()}

    def run(method, *args, **kwargs):
        fn = lambda p, *a: model.apply({"params": p}, *a, method=method, **kwargs)  # noqa: E731
        return jax.eval_shape(fn, params, *args)

    train = run(None, images, tokens, rngs=rngs)
    image = run(model.encode_image, images)
    text = run(model.encode_text, tokens)
    result = {"train": shapes(train), "image": shapes(image), "text": shapes(text)}
    if model.use_captioning:
        logits, targets = run(model.caption_logits, image["image_tokens"], tokens)
        result["caption"] = {"logits": logits.shape, "targets": targets.shape}
    return result


@pytest.mark.parametrize("size", ["tiny", "B/16", "L/14"])
def test_entry_point_shapes(size):
    m = config_for(size).model
    model = build.from_config(m)
    b, n, t, e = 2, (m.image_size // m.patch_size) ** 2, m.max_text_len, m.embed_dim
    s = _entry_point_shapes(model, b)
    patch_dim = m.patch_size**2 * 3
    assert s["train"] == {
        "image_embedding": (b, e),
        "text_embedding": (b, e),
        "temperature": (),
        "relevance": (b, n),
        "caption_indices": (b, n // 2),
        "caption_logits": (b, t, m.vocab_size),
        "caption_targets": (b, t),
        "caption_weights": (b, t),
        "tgmim_prediction": (b, n, patch_dim),
        "tgmim_target": (b, n, patch_dim),
        "tgmim_mask": (b, n),
    }
    assert s["image"] == {
        "embedding": (b, e),
        "patch_states": (b, n, m.image_width),
        "image_tokens": (b, m.caption_queries, m.text_width),
    }
    assert s["text"] == {"embedding": (b, e), "token_states": (b, t, m.text_width)}
    assert s["caption"] == {"logits": (b, t, m.vocab_size), "targets": (b, t)}


def test_parameter_counts_match_reference_vits():
    b16 = build.param_counts(build.abstract_params(build.from_config(config_for("B/16").model)))
    l14 = build.param_counts(build.abstract_params(build.from_config(config_for("L/14").model)))
    # ViT-B/16 at 224 px without a classifier head: 85.8M; ViT-L/14: 303M.
    assert abs(b16["image_encoder"] / 85.8e6 - 1) < 0.01
    assert abs(l14["image_encoder"] / 303e6 - 1) < 0.01
    assert b16["total"] == sum(v for k, v in b16.items() if k != "total")


@pytest.mark.parametrize(
    "objective, present, absent",
    [
        ("sycoca", {"caption_logits", "tgmim_prediction", "relevance"}, set()),
        ("coca", {"caption_logits"}, {"tgmim_prediction", "relevance", "caption_indices"}),
        ("clip", set(), {"caption_logits", "tgmim_prediction", "relevance"}),
    ],
)
def test_objective_presets(objective, present, absent):
    model = build.from_config(config_for(f"tiny,objective={objective}").model)
    s = _entry_point_shapes(model)["train"]
    assert present <= set(s)
    assert not absent & set(s)
    params = build.param_counts(build.abstract_params(model))
    assert (params["tgmim_decoder"] > 0) == (objective == "sycoca")
    assert (params["multimodal_decoder"] > 0) == (objective != "clip")


@pytest.mark.parametrize("layout, tokens", [("cascade", 16), ("parallel", 16), ("single", 15)])
def test_pooler_layouts(layout, tokens):
    m = config_for("tiny").model
    m.pooler = layout
    s = _entry_point_shapes(build.from_config(m))
    assert s["image"]["image_tokens"] == (2, tokens, m.text_width)
    assert s["train"]["image_embedding"] == (2, m.embed_dim)


def test_unknown_model_field_is_named():
    m = config_for("tiny").model.to_dict()
    m["image_widht"] = 3
    with pytest.raises(ValueError, match="image_widht"):
        build.from_config(m)


def test_old_field_spellings_still_build_the_same_model():
    """``ic_masking``/``ic_keep_ratio`` (renamed ``caption_*``) from the command line or from a
    config saved in an old checkpoint map to the new fields."""
    m = config_for("tiny").model
    m.ic_masking, m.ic_keep_ratio = "random", 0.25
    model = build.from_config(m)
    assert (model.caption_masking, model.caption_keep_ratio) == ("random", 0.25)
    saved = config_for("tiny").model.to_dict()  # as an old checkpoint stores it
    saved["ic_masking"] = saved.pop("caption_masking")
    del saved["caption_keep_ratio"], saved["ic_keep_ratio"]
    assert build.from_config(saved).caption_masking == "attentive"


def test_invalid_choices_fail_clearly(tiny_inputs):
    images, tokens = tiny_inputs
    for field, value, message in [
        ("pooler", "triple", "pooler must be one of"),
        ("caption_masking", "sideways", "masking mode"),
        ("tgmim_masking", "none", "TG-MIM needs masked patches"),
        ("caption_keep_ratio", 1.0, "caption_keep_ratio"),
    ]:
        m = config_for("tiny").model
        m[field] = value
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(
                lambda i, t, m=m: build.from_config(m).init(
                    {"params": jax.random.key(0), "masking": jax.random.key(0)}, i, t
                ),
                images,
                tokens,
            )
