"""The pretrained towers: the checkpoint's model rebuilt from its own config, only the needed
parameter subtrees restored, and the forward pieces each task runs on them.

A task's parameters are ``{"tower": {subtree: ...}, "head": ...}``. The tower part is a subset of
a SyCoCa's parameters (e.g. only ``image_encoder``), applied with ``SyCoCa.apply(..., method=f)``
where ``f`` touches only those submodules, so nothing else is read or allocated.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from sycoca_jax import checkpoint as ckpt
from sycoca_jax.models import build, sycoca
from sycoca_jax.models.text import caption_input_and_target

Array = jax.Array

# Model fields a transfer run may change: how it computes, not what it computes.
COMPUTE_FIELDS = ("dtype", "attention_impl", "remat", "scan_unroll")
PROBE_FEATURES = ("mean_patch", "embedding", "mean_patch+embedding")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretraining checkpoint: where it is, its step, its config and the model it builds."""

    path: str
    step: int
    config: ml_collections.ConfigDict
    model: sycoca.SyCoCa

    def tower_params(self, names: Sequence[str], shardings: Mapping[str, Any]) -> dict[str, Any]:
        """The parameter subtrees ``names``, checked against the model and placed on
        ``shardings`` (one tree of ``NamedSharding``s per name)."""
        abstract = abstract_tower(self.model, names, boxed=False)
        out = {}
        for name in names:
            loaded = ckpt.load_params(self.path, name, step=self.step)
            mismatch = ckpt.describe_mismatch(abstract[name], loaded)
            if mismatch:
                raise ckpt.IncompatibleCheckpointError(
                    f"{self.path} step {self.step}: subtree {name!r} does not fit the model its "
                    f"own config builds:\n{mismatch}"
                )
            out[name] = jax.device_put(loaded, shardings[name])
        return out


def _locate(path: str, step: int | None) -> tuple[str, int | None]:
    """Accept a workdir, its ``checkpoints`` folder or one step's folder (``.../checkpoints/N``)."""
    directory = epath.Path(path)
    if directory.name.isdigit() and directory.parent.name == ckpt.CHECKPOINT_DIR:
        if step is not None and step != int(directory.name):
            raise ValueError(f"--init names step {directory.name} but init_step is {step}")
        return os.fspath(directory.parent), int(directory.name)
    return path, step


def load_pretrained(
    path: str, step: int | None = None, overrides: Mapping[str, Any] | None = None
) -> Pretrained:
    """The checkpoint at ``path`` (latest step unless ``step``), its config and model.

    ``overrides`` may change the compute fields (``COMPUTE_FIELDS``) of the model; ``None``
    values keep the checkpoint's.
    """
    path, step = _locate(path, step)
    directory = ckpt.checkpoint_dir(path)
    if not directory.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path!r} (expected <workdir>/checkpoints/<step>)"
        )
    checkpointer = ckpt.Checkpointer(os.fspath(directory.parent), async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise FileNotFoundError(
                f"{directory} has no checkpoint at step {step} (steps: "
                f"{list(checkpointer.all_steps())})"
            )
        config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    finally:
        checkpointer.close()
    model_config = config.model.to_dict()
    for key, value in (overrides or {}).items():
        if key not in COMPUTE_FIELDS:
            raise ValueError(
                f"model field {key!r} cannot change in transfer; only {COMPUTE_FIELDS} can"
            )
        if value is not None:
            model_config[key] = value
    return Pretrained(os.fspath(directory), step, config, build.from_config(model_config))


def abstract_tower(model: sycoca.SyCoCa, names: Sequence[str], boxed: bool = True) -> dict:
    """Shapes of the parameter subtrees ``names`` (boxed with their logical axis names)."""
    params = build.abstract_params(model, boxed=boxed)
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the pretrained model has no {missing}; it has {sorted(params)}")
    return {n: params[n] for n in names}


def subtrees(*names: str) -> tuple[str, ...]:
    """``names`` plus ``log_temperature``: ``SyCoCa.setup`` creates that parameter eagerly (its
    submodules are lazy), so every apply needs it, though no task uses it."""
    return (*names, "log_temperature")


# ------------------------------------------------------------------------------ forward pieces
# Each is ``f(model, ...)`` for ``model.apply({"params": tower}, ..., method=f)``.


def patch_states(model: sycoca.SyCoCa, images: Array) -> Array:
    """(B, H, W, 3) -> the image encoder's patch states (B, N, D_img)."""
    return model.image_encoder(images)


def probe_features(model: sycoca.SyCoCa, images: Array, kind: str) -> Array:
    """Frozen features for the linear probe: ``mean_patch`` (mean of the patch states),
    ``embedding`` (the unit-norm contrastive image embedding) or both concatenated."""
    if kind not in PROBE_FEATURES:
        raise ValueError(f"linear_probe.feature must be one of {PROBE_FEATURES}, got {kind!r}")
    if kind == "mean_patch":
        return jnp.mean(model.image_encoder(images).astype(jnp.float32), axis=1)
    encoded = model.encode_image(images)  # patch states and the embedding, one encoder pass
    if kind == "embedding":
        return encoded["embedding"]
    mean = jnp.mean(encoded["patch_states"].astype(jnp.float32), axis=1)
    return jnp.concatenate([mean, encoded["embedding"]], axis=-1)


def probe_subtrees(model: sycoca.SyCoCa, kind: str) -> tuple[str, ...]:
    """The parameter subtrees ``probe_features(kind)`` reads."""
    if kind == "mean_patch":
        return subtrees("image_encoder")
    present = build.abstract_params(model)  # the image side of encode_image, as built
    image_side = ("image_encoder", "caption_pooler", "contrastive_pooler", "image_projection")
    return subtrees(*(n for n in image_side if n in present))


VQA_SUBTREES = subtrees("image_encoder", "caption_pooler", "text_encoder", "multimodal_decoder")


def _question_forward(
    model: sycoca.SyCoCa, images: Array, tokens: Array, qa_tokens: Array | None
) -> tuple[Array, Array | None]:
    """Image tokens once per image, repeated for its Q questions; the multimodal decoder's states
    of the questions, and (optionally) teacher-forced logits of the question+answer texts."""
    b, q = tokens.shape[:2]
    image_tokens = model.image_tokens(model.image_encoder(images))
    image_tokens = jnp.repeat(image_tokens, q, axis=0)
    states, _ = model.caption_states(image_tokens, tokens.reshape(b * q, -1))
    qa_logits = None
    if qa_tokens is not None:
        qa_logits, _ = model.caption_logits(image_tokens, qa_tokens.reshape(b * q, -1))
    return states, qa_logits


def question_states(
    model: sycoca.SyCoCa,
    tower: Any,
    images: Array,
    tokens: Array,
    qa_tokens: Array | None = None,
) -> dict[str, Array]:
    """CoCa's VQA features: the question (B, Q, L+1) through the unimodal text decoder and the
    multimodal decoder cross-attending to the image.

    Returns ``states`` (B·Q, L, D_txt), the multimodal decoder's final (post-LayerNorm) token
    states, i.e. what its vocabulary projection reads; ``valid`` (B·Q, L) its non-pad inputs; and
    with ``qa_tokens`` the captioning ``qa_logits`` (B·Q, L, V) and ``qa_targets`` (B·Q, L).
    """
    states, qa_logits = model.apply(
        {"params": tower}, images, tokens, qa_tokens, method=_question_forward
    )
    text_input, _ = caption_input_and_target(tokens.reshape((-1, tokens.shape[-1])))
    out = {"states": states, "valid": text_input != model.pad_id}
    if qa_tokens is not None:
        _, qa_targets = caption_input_and_target(qa_tokens.reshape((-1, qa_tokens.shape[-1])))
        out["qa_logits"], out["qa_targets"] = qa_logits, qa_targets
    return out
