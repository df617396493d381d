"""Prompt templates and class names for zero-shot classification (data, not code).

Templates use ``{}`` for the class name and may use ``{a}`` for its indefinite article.
"""

from __future__ import annotations

# CLIP's 80 ImageNet prompt templates (Radford et al. 2021), the set CoCa reuses.
CLIP_IMAGENET = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

# The 7-template subset CLIP found best on ImageNet.
CLIP_SIMPLE = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)  # fmt: skip

# The embedded dataset's label is the largest shape's colour and kind; its captions describe it
# in these phrasings.
SHAPES = (
    "the largest shape is {a} {}",
    "{a} {}",
    "an image with {a} {}",
)

TEMPLATE_SETS = {"clip_imagenet": CLIP_IMAGENET, "clip_simple": CLIP_SIMPLE, "shapes": SHAPES}


def article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def prompts(name: str, templates: tuple[str, ...]) -> list[str]:
    """Every template filled with ``name``."""
    return [t.format(name, a=article(name)) for t in templates]


def readable_imagenet_names() -> list[str]:
    """ImageNet's 1000 classes in label order, as the first WordNet lemma of each synset
    (e.g. ``tench``, ``goldfish``), read from the list tensorflow-datasets ships."""
    from tensorflow_datasets.datasets.siscore import labels

    return [entry.split(",")[0].strip() for entry in labels.IMAGENET_LABELS_LIST]
