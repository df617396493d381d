"""TFDS builder of the embedded ``sycoca_shapes`` dataset (ArrayRecord, generated, no download).

Records (``info.features``):

  ``id``            text, ``"<split>_<index>"``: the generator's index of the record
  ``image``         PNG, ``image_size`` x ``image_size`` x 3
  ``captions``      5 texts (``shapes.captions``)
  ``label``         class of the main shape, ``CLASS_NAMES[label] == "<colour> <kind>"``
  ``objects``       per shape: ``kind``, ``colour``, ``size``, ``position`` (class labels)
  ``questions``     4 texts: colour, kind, count, position questions (in that order)
  ``answers``       4 texts, one answer each
  ``compositional`` true for test scenes whose main shape is a held-out colour/kind pair

``clutter`` builds (``sycoca_shapes/clutter``; ``sycoca_jax.data.clutter``) add caption-unrelated
content and two features describing it:

  ``distractors``   per undescribed object: ``kind``, ``colour``, ``position`` (class labels)
  ``background``    the background texture (class label)

Config names encode every knob (``64px_train20000_val1000_test2000_seed0`` is the default,
``clutter_64px_...`` its cluttered twin), so datasets of different sizes live side by side under
``<data_dir>/sycoca_shapes/``. Records are a function of ``(seed, split, index)``; the index is
in ``id``, so anything the generator knows (e.g. ``shapes.object_masks``) can be recomputed for
a record with ``regenerate``.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from sycoca_jax.data import clutter, shapes

DEFAULT_IMAGE_SIZE = 64
DEFAULT_SPLIT_SIZES = {"train": 20_000, "validation": 1_000, "test": 2_000}
COMPOSITIONAL_FRACTION = 0.25  # share of test scenes with a held-out main pair
VERSION = tfds.core.Version("1.0.0")
_NAME_PATTERN = re.compile(r"^(clutter_)?(\d+)px_train(\d+)_val(\d+)_test(\d+)_seed(\d+)$")
CLUTTER_ALIAS = "clutter"  # sycoca_shapes/clutter: the default sizes with clutter


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed of one ``sycoca_shapes`` build."""

    image_size: int = DEFAULT_IMAGE_SIZE
    num_train: int = DEFAULT_SPLIT_SIZES["train"]
    num_validation: int = DEFAULT_SPLIT_SIZES["validation"]
    num_test: int = DEFAULT_SPLIT_SIZES["test"]
    seed: int = 0
    clutter: bool = False

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


def shapes_config(
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_train: int = DEFAULT_SPLIT_SIZES["train"],
    num_validation: int = DEFAULT_SPLIT_SIZES["validation"],
    num_test: int = DEFAULT_SPLIT_SIZES["test"],
    seed: int = 0,
    clutter: bool = False,
) -> ShapesConfig:
    """A config named after its values, e.g. ``64px_train20000_val1000_test2000_seed0``
    (``clutter_64px_...`` with caption-unrelated clutter)."""
    for key, value in dict(
        image_size=image_size, num_train=num_train, num_validation=num_validation, num_test=num_test
    ).items():
        if value < 1:
            raise ValueError(f"sycoca_shapes: {key} must be positive, got {value}")
    if image_size < 16:
        raise ValueError(f"sycoca_shapes: image_size must be at least 16, got {image_size}")
    name = f"{image_size}px_train{num_train}_val{num_validation}_test{num_test}_seed{seed}"
    what = "coloured shapes"
    if clutter:
        name = f"clutter_{name}"
        what += " among undescribed distractors on textured backgrounds"
    return ShapesConfig(
        name=name,
        version=VERSION,
        image_size=image_size,
        num_train=num_train,
        num_validation=num_validation,
        num_test=num_test,
        seed=seed,
        clutter=clutter,
        description=f"{image_size}x{image_size} scenes of 1-3 {what}, seed {seed}",
    )


def config_from_name(name: str) -> ShapesConfig:
    """Inverse of ``shapes_config(...).name``; ``"sycoca_shapes"`` alone is the default."""
    if name in ("sycoca_shapes", "sycoca_shapes/"):
        return shapes_config()
    config_name = name.removeprefix("sycoca_shapes/")
    if config_name == CLUTTER_ALIAS:
        return shapes_config(clutter=True)
    match = _NAME_PATTERN.match(config_name)
    if not match:
        raise ValueError(
            f"bad sycoca_shapes config {config_name!r}: expected 'sycoca_shapes', "
            "'sycoca_shapes/clutter' or 'sycoca_shapes/[clutter_]<size>px_train<n>_val<n>_test<n>"
            "_seed<n>', e.g. 'sycoca_shapes/128px_train50000_val1000_test2000_seed0'"
        )
    size, train, val, test, seed = (int(g) for g in match.groups()[1:])
    return shapes_config(size, train, val, test, seed, clutter=bool(match.group(1)))


CLUTTER_FEATURES = {
    "distractors": tfds.features.Sequence(
        {
            "kind": tfds.features.ClassLabel(names=clutter.DISTRACTOR_KINDS),
            "colour": tfds.features.ClassLabel(names=clutter.DISTRACTOR_COLOUR_NAMES),
            "position": tfds.features.ClassLabel(names=shapes.POSITIONS),
        }
    ),
    "background": tfds.features.ClassLabel(names=clutter.TEXTURES),
}


class SycocaShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Captioned shapes; see the module docstring for the features."""

    name = "sycoca_shapes"
    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "First release."}
    # The default; any other ShapesConfig is accepted too (see shapes_config()).
    BUILDER_CONFIGS = [shapes_config(), shapes_config(clutter=True)]

    def __init__(self, *, config: ShapesConfig | str | None = None, **kwargs):
        config = config or self.BUILDER_CONFIGS[0]
        if not isinstance(config, str) and config.name in {c.name for c in self.BUILDER_CONFIGS}:
            config = config.name  # tfds wants predefined configs by name (also when unpickled)
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        features = tfds.features.FeaturesDict(
            {
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "captions": tfds.features.Sequence(
                    tfds.features.Text(), length=shapes.NUM_CAPTIONS
                ),
                "label": tfds.features.ClassLabel(names=shapes.CLASS_NAMES),
                "objects": tfds.features.Sequence(
                    {
                        "kind": tfds.features.ClassLabel(names=shapes.KINDS),
                        "colour": tfds.features.ClassLabel(names=shapes.COLOUR_NAMES),
                        "size": tfds.features.ClassLabel(names=shapes.SIZES),
                        "position": tfds.features.ClassLabel(names=shapes.POSITIONS),
                    }
                ),
                "questions": tfds.features.Sequence(
                    tfds.features.Text(), length=shapes.NUM_QUESTIONS
                ),
                "answers": tfds.features.Sequence(
                    tfds.features.Text(), length=shapes.NUM_QUESTIONS
                ),
                "compositional": np.bool_,
                **(CLUTTER_FEATURES if self.builder_config.clutter else {}),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=features,
            supervised_keys=("image", "label"),
            homepage="https://github.com/sycoca_jax",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated
        return {
            split: self._generate_examples(split=split, count=count)
            for split, count in self.builder_config.split_sizes().items()
        }

    def _generate_examples(self, split: str, count: int):
        config = self.builder_config
        for index in range(count):
            example = regenerate(config, split, index)
            key = f"{split}_{index:07d}"
            yield key, record(example, key, config.image_size)


def regenerate(config: ShapesConfig, split: str, index: int) -> shapes.Example:
    """The example behind record ``f"{split}_{index:07d}"`` of ``config``'s build."""
    make = clutter.make_example if config.clutter else shapes.make_example
    return make(config.seed, split, index, COMPOSITIONAL_FRACTION)


def parse_id(record_id: str | bytes) -> tuple[str, int]:
    """``"test_0000042"`` -> ``("test", 42)``."""
    text = record_id.decode() if isinstance(record_id, bytes) else str(record_id)
    split, _, index = text.rpartition("_")
    if split not in shapes.SPLITS or not index.isdigit():
        raise ValueError(f"{text!r} is not a sycoca_shapes record id ('<split>_<index>')")
    return split, int(index)


def record(example: shapes.Example, key: str, image_size: int) -> dict:
    """The TFDS record of one generated example."""
    scene = example.scene
    extra = {}
    if example.clutter is not None:
        extra = {
            "distractors": [
                {"kind": d.kind, "colour": d.colour, "position": d.position}
                for d in example.clutter.distractors
            ],
            "background": example.clutter.texture,
        }
    return {
        "id": key,
        "image": shapes.encode_png(clutter.render_example(example, image_size)),
        "captions": list(example.captions),
        "label": scene.label,
        "objects": [
            {"kind": s.kind, "colour": s.colour, "size": s.size, "position": s.position}
            for s in scene.shapes
        ],
        "questions": list(example.questions),
        "answers": list(example.answers),
        "compositional": scene.compositional,
        **extra,
    }


def prepare(config: ShapesConfig | None = None, data_dir: str | None = None) -> SycocaShapes:
    """The builder of ``config`` in ``data_dir``, generating the data first if it is missing."""
    builder = SycocaShapes(config=config, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except Exception:
        # Several processes sharing a data_dir may generate at once; TFDS writes to a temporary
        # folder and renames it, so a loser of that race finds the winner's complete copy.
        builder = SycocaShapes(config=config, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise
    return builder
