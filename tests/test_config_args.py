"""Config arguments: parsing, unknown keys, and every size/objective building a valid model."""

from __future__ import annotations

import pytest

from sycoca_jax.config_args import load_config, parse_arg
from sycoca_jax.models import vit
from tests.helpers import ROOT, config_for


def test_parse_arg_types_and_positional():
    args = parse_arg(
        "B/16,steps=10,lr=0.5,debug", positional="size", size="tiny", steps=1, lr=1.0, debug=False
    )
    assert (args.size, args.steps, args.lr, args.debug) == ("B/16", 10, 0.5, True)
    assert parse_arg(None, size="tiny").size == "tiny"


def test_parse_arg_rejects_unknown_and_malformed():
    with pytest.raises(ValueError, match="unknown config argument 'sise'"):
        parse_arg("sise=B/16", size="tiny")
    with pytest.raises(ValueError, match="no '='"):
        parse_arg("B/16", size="tiny")
    with pytest.raises(ValueError, match="expected a boolean"):
        parse_arg("debug=maybe", debug=False)


@pytest.mark.parametrize("size", ["tiny", "S/16", "B/16", "B/32", "L/14"])
@pytest.mark.parametrize("objective", ["sycoca", "coca", "clip"])
def test_every_size_and_objective(size, objective):
    config = config_for(f"size={size},objective={objective}")
    assert config.model.use_tgmim == (objective == "sycoca")
    assert config.model.use_captioning == (objective != "clip")
    assert (config.loss.tgmim_weight > 0) == config.model.use_tgmim
    assert (config.loss.caption_weight > 0) == config.model.use_captioning
    assert config.model.image_size % config.model.patch_size == 0


def test_unknown_size_is_named():
    with pytest.raises(ValueError, match="unknown size 'XL/8'"):
        config_for("size=XL/8")


def test_locked_config_rejects_new_keys():
    config = load_config(f"{ROOT / 'configs' / 'sycoca.py'}:tiny")
    config.lock()
    with pytest.raises(AttributeError, match="widht"):
        config.model.widht = 3


@pytest.mark.parametrize("size", ["S/16", "B/16", "B/32", "L/14"])
def test_image_tower_is_the_vit_variant(size):
    """Each preset's image tower is the ViT variant of its name (one table: vit.VIT_VARIANTS)."""
    model = config_for(size).model
    name, patch = size.split("/")
    variant = vit.VIT_VARIANTS[name]
    image = (model.image_width, model.image_depth, model.image_heads, model.image_mlp_dim)
    assert image == (variant["width"], variant["depth"], variant["num_heads"], variant["mlp_dim"])
    assert model.patch_size == int(patch)


@pytest.mark.parametrize("size", ["tiny", "S/16", "B/16", "B/32", "L/14"])
def test_scan_default(size):
    """Layers are scanned for every real size (one compiled block) and unrolled for tiny."""
    assert config_for(size).model.scan == (size != "tiny")
