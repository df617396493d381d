"""The analytic FLOP count agrees with XLA's cost analysis on CPU for every objective."""

from __future__ import annotations

import pytest

from sycoca_jax import flops
from sycoca_jax.config_args import load_config
from sycoca_jax.tools import summary
from tests.helpers import ROOT, config_for


@pytest.mark.parametrize(
    "arg",
    ["tiny", "tiny,objective=coca", "tiny,objective=clip"],
)
def test_analytic_flops_match_xla_on_cpu(arg):
    m = config_for(arg).model
    # Widen the tiny model so matmuls dominate elementwise work, as in real sizes.
    m.image_width = m.text_width = m.decoder_width = 128
    m.image_mlp_dim = m.text_mlp_dim = m.decoder_mlp_dim = 512
    analytic = flops.forward_flops_per_example(m)["total"]
    xla = summary.xla_forward_flops(m)
    assert 0.97 < xla / analytic < 1.06, (arg, xla / analytic)


@pytest.mark.parametrize("arg", ["coca_tiny", "coca_tiny,objective=coca"])
def test_analytic_flops_match_xla_for_the_open_clip_layout(arg):
    """Class token and open_clip's two-block multimodal layer; with coca, no pooler. (Exact
    GELU's erf polynomial alone adds ~6% elementwise work at these widths, which the analytic
    count of matmuls leaves out as it leaves out every elementwise op: tanh GELU here.)"""
    m = load_config(f"{ROOT / 'configs' / 'open_clip.py'}:{arg}").model
    m.image_width = m.text_width = m.decoder_width = m.embed_dim = 128
    m.image_mlp_dim = m.text_mlp_dim = m.decoder_mlp_dim = 512
    m.gelu_approximate = True
    if not m.use_tgmim:  # the coca case also covers the no-pooler layout
        m.pooler, m.image_final_norm, m.pooler_query_norm = "none", True, False
    analytic = flops.forward_flops_per_example(m)["total"]
    xla = summary.xla_forward_flops(m)
    assert 0.97 < xla / analytic < 1.06, (arg, xla / analytic)


def test_variants_change_the_count_where_expected():
    m = config_for("B/16").model
    base = flops.forward_flops_per_example(m)
    reuse = m.copy_and_resolve_references()
    reuse.branch_encoding = "reuse"
    n = (m.image_size // m.patch_size) ** 2
    assert flops.forward_flops_per_example(reuse)["image_encoder"] == flops.vit_flops(m, n)
    assert base["image_encoder"] == flops.vit_flops(m, n) + 2 * flops.vit_flops(m, n // 2)
    coca = flops.forward_flops_per_example(config_for("B/16,objective=coca").model)
    assert "tgmim_decoder" not in coca and coca["total"] < base["total"]
    assert flops.train_flops_per_example(m) == 3 * base["total"]
