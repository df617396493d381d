"""The optimiser: AdamW with warmup + cosine/linear decay, global-norm clipping, and no weight
decay on biases, norms, position embeddings, learned tokens or the temperature."""

from __future__ import annotations

from typing import Any

import jax
import optax

# Only these leaves are decayed: dense kernels and the token-embedding table. Everything else
# (bias, LayerNorm scale, pos_embedding, cls, mask_token, pooler queries, log_temperature) is not.
DECAYED_LEAVES = ("kernel", "embedding")


def weight_decay_mask(params: Any) -> Any:
    """A tree of booleans, True where weight decay applies (decided by the leaf's name)."""

    def decide(path, _):
        # The last dict key names the leaf, also when it sits inside an nn.Partitioned box.
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in DECAYED_LEAVES

    return jax.tree_util.tree_map_with_path(decide, params)


def learning_rate_schedule(
    optim_config: Any, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then ``cosine``/``linear`` decay to ``lr·end_lr_fraction``
    at ``total_steps`` (or ``constant``)."""
    peak = optim_config.lr
    end = peak * optim_config.end_lr_fraction
    decay_steps = max(total_steps - warmup_steps, 1)
    kind = optim_config.schedule
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_config.end_lr_fraction)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.schedule must be cosine, linear or constant, got {kind!r}")
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps]
    )


def make_optimizer(
    optim_config: Any, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(optim_config, total_steps, warmup_steps)
    parts = []
    if optim_config.grad_clip:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
