r"""Convert a checkpoint's parameters to another layer layout or image size, for transfer.

  python -m sycoca_jax.tools.convert_checkpoint --checkpoint=WORKDIR --out=NEW_WORKDIR \
      [--layout=scan|unrolled] [--image_size=384] [--resample=bilinear|bicubic] [--step=N]

``--layout`` re-stacks the transformer blocks (``model.scan``); ``--image_size`` resamples the
learned position embeddings of the image encoder and the TG-MIM decoder to the new patch grid.
The new checkpoint (same step) holds the parameters and the checkpoint's config with
``model.scan`` / ``model.image_size`` updated, so ``sycoca_jax.evaluate`` (with a config of the
same model), transfer (``--init``) and ``config.init.checkpoint`` read it. It holds no optimiser
or data state: it starts new runs, it does not resume one. ``--out`` must not exist yet (or be
empty); nothing is overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import app, flags
from etils import epath

from sycoca_jax import checkpoint as ckpt
from sycoca_jax.models import build, convert
from sycoca_jax.transfer import towers

LAYOUTS = {"scan": True, "unrolled": False}
EXPECTED_ERRORS = (
    FileExistsError,
    FileNotFoundError,
    ckpt.IncompatibleCheckpointError,
    convert.ConversionError,
)


def _check_fits(params: Any, model_fields: dict[str, Any], what: str) -> None:
    mismatch = ckpt.describe_mismatch(
        build.abstract_params(build.from_config(ml_collections.ConfigDict(model_fields))),
        params,
    )
    if mismatch:
        raise ckpt.IncompatibleCheckpointError(f"{what}:\n{mismatch}")


def convert_checkpoint(
    checkpoint: str,
    out: str,
    layout: str | None = None,
    image_size: int | None = None,
    method: str = "bilinear",
    step: int | None = None,
) -> dict[str, Any]:
    """Write the converted checkpoint under ``out``; returns what was done."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    target = epath.Path(out)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"--out={out} already exists and is not empty; give a new folder")
    source = towers.load_pretrained(checkpoint, step)  # the step and the config it was run with
    config, step = source.config, source.step
    params = ckpt.load_params(source.path, step=step)
    old_model = config.model.to_dict()
    _check_fits(params, old_model, f"{source.path}/{step} does not fit its own config's model")
    scan = None if layout is None else LAYOUTS[layout]
    params, new_model = convert.convert(params, old_model, scan, image_size, method)
    _check_fits(params, new_model, "the converted parameters do not fit the converted model")
    config.model.scan = new_model["scan"]
    config.model.image_size = new_model["image_size"]
    writer = ckpt.Checkpointer(out, max_to_keep=None, async_save=False)
    try:
        writer.save(step, {"params": params}, config=config, force=True)
        writer.wait()
    finally:
        writer.close()
    changed = {k: [old_model[k], new_model[k]] for k in ("scan", "image_size")}
    return {
        "source": f"{source.path}/{step}",
        "out": os.fspath(ckpt.checkpoint_dir(out) / str(step)),
        "changed": {k: v for k, v in changed.items() if v[0] != v[1]},
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        summary = convert_checkpoint(
            f.checkpoint, f.out, f.layout, f.image_size, method=f.resample, step=f.step
        )
    except EXPECTED_ERRORS as error:  # bad input: one line, no traceback
        raise SystemExit(f"convert_checkpoint: {error}") from None
    print(json.dumps(summary, indent=2))


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    flags.DEFINE_string("checkpoint", None, "Workdir or checkpoints folder to read.")
    flags.DEFINE_string("out", None, "New workdir for the converted checkpoint (must not exist).")
    flags.DEFINE_enum("layout", None, sorted(LAYOUTS), "Layer layout (default: keep).")
    flags.DEFINE_integer("image_size", None, "New image size in pixels (default: keep).")
    flags.DEFINE_enum("resample", "bilinear", convert.RESAMPLE_METHODS, "Interpolation.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["checkpoint", "out"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
