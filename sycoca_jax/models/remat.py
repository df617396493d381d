"""Rematerialisation policies (``model.remat``): which values a block's forward pass keeps for
the backward, the rest being recomputed there.

Names given to values with ``checkpoint_name`` let a policy keep them: ``layers`` tags the
queries, keys and values after their bias and the MLP's activation; splash attention tags its
residuals (``attention.ATTENTION_RESIDUALS``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from sycoca_jax.models.attention import ATTENTION_RESIDUALS

# Names that let a remat policy keep a value: the MLP's activation, and the queries, keys and
# values (after their bias) that attention kernels read again in their backward.
MLP_ACTIVATION = "mlp_activation"
ATTENTION_INPUTS = "attention_inputs"
# jax.nn.dot_product_attention's cuDNN forward call, whose outputs are the output and the softmax
# statistics its backward reads.
_CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def save_dots_and(*names: str) -> Callable:
    """``dots`` plus what an attention kernel reads and returns for its backward (queries, keys
    and values after their bias; output and softmax statistics: cuDNN's forward call, splash's
    named residuals) and the values tagged with ``names``.

    Why: under ``dots`` the backward re-runs every attention kernel's forward (on one H200,
    SyCoCa-B/16's attention took 35.7 ms of its step; batch 128 without remat took 12.3) and
    every q/k/v bias add; and it recomputes the GELU from the saved product, re-reading and
    re-writing the widest activation. Keeping q, k and v after the bias, rather than the bare
    products, also lets XLA fold the bias into the product's cuBLAS call."""

    def policy(prim: Any, *args: Any, **params: Any) -> bool:
        if jax.checkpoint_policies.checkpoint_dots(prim, *args, **params):
            return True
        if prim.name == _CUDNN_ATTENTION_FORWARD:
            return True
        return prim.name == "name" and params.get("name") in (
            ATTENTION_INPUTS,
            ATTENTION_RESIDUALS,
            *names,
        )

    return policy


REMAT_POLICIES: dict[str, Callable] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_attention": save_dots_and(),
    "dots_attention_gelu": save_dots_and(MLP_ACTIVATION),
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy(name: str) -> Callable:
    """The policy called ``name``; an unknown name is one clear error."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of none, {', '.join(REMAT_POLICIES)}; got {name!r}")
    return REMAT_POLICIES[name]
