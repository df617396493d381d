r"""Export a checkpoint in open_clip's CoCa layout as an open_clip state dict (``.safetensors``).

Hand a run back to open_clip (the whole round trip, import, training, export, is in
``sycoca_jax.tools.import_open_clip``)::

  python -m sycoca_jax.tools.export_open_clip --workdir=/runs/sycoca_b32 \
      --out=/runs/sycoca_b32.safetensors

open_clip then loads it with ``open_clip.create_model_and_transforms("coca_ViT-B-32",
pretrained="/runs/sycoca_b32.safetensors")``; ``--out``'s ``.json`` sibling is the open_clip model
config (for a model that is not a preset: ``open_clip.add_model_config(that file)``). The TG-MIM
head has no place in open_clip's CoCa and is dropped (a note says so). The model must be in
open_clip's layout (``configs/open_clip.py``); anything else is refused, naming the fields. A model
trained with the corrected CLS mask needs ``model.text.correct_cls_mask = True`` in open_clip
(it builds the legacy one): the note says so too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import flags, logging

from sycoca_jax import binaries
from sycoca_jax import checkpoint as ckpt
from sycoca_jax.interop import open_clip_config, open_clip_weights
from sycoca_jax.models import build, sycoca


def export_open_clip(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
    """Write the checkpoint's parameters (latest step unless ``step``) to ``out`` in open_clip's
    layout, and its open_clip model config beside it; returns ``tensors``, ``dropped``,
    ``notes``, ``config_path``."""
    if not out.endswith(".safetensors"):
        raise open_clip_config.OpenClipError(f"--out must name a .safetensors file, got {out!r}")
    step, _ = ckpt.params_metadata(workdir, step)
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir).parent, async_save=False)
    try:
        config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    finally:
        checkpointer.close()
    fields = build.model_fields(config.model)
    model = sycoca.SyCoCa(**fields)
    open_clip_config.check_open_clip_layout(open_clip_weights.model_fields_of(model))
    params = ckpt.load_params(workdir, step=step)
    state, dropped = open_clip_weights.to_state_dict(params, model)
    notes = [f"dropped {name}: open_clip's CoCa has no such head" for name in dropped]
    if model.cls_mask == "corrected":
        notes.append(
            "trained with the corrected CLS mask: set model.text.correct_cls_mask = True after "
            "loading in open_clip (it builds the legacy mask)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    open_clip_weights.write_safetensors(
        state, out, metadata={"sycoca_step": str(step), "sycoca_workdir": str(workdir)}
    )
    config_path = out[: -len(".safetensors")] + ".json"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(open_clip_config.open_clip_config(open_clip_weights.model_fields_of(model)), f)
    for note in notes:
        logging.warning("%s", note)
    logging.info("wrote %d tensors (step %d) to %s and %s", len(state), step, out, config_path)
    return dict(tensors=len(state), dropped=dropped, notes=notes, config_path=config_path)


def main(f: flags.FlagValues) -> None:
    done = export_open_clip(f.workdir, f.out, f.step)
    print(f"wrote {f.out} ({done['tensors']} tensors) and {done['config_path']}")
    for note in done["notes"]:
        print(f"note: {note}")


def define_flags() -> None:
    """Flags are defined here, not at import, so importing this module has no side effects."""
    flags.DEFINE_string("workdir", None, "a workdir (or its checkpoints folder)")
    flags.DEFINE_string("out", None, "the .safetensors file to write")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    binaries.run_tool(main, define_flags)  # the input's faults (UserError) in one line
