"""The cluttered shapes build: deterministic, captions blind to the clutter, coverage of the
described shapes only."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sycoca_jax.data import clutter, shapes, shapes_builder, sources


def _cell_of_pixels(size: int) -> np.ndarray:
    rows = np.minimum(np.arange(size) * 3 // size, 2)
    return rows[:, None] * 3 + rows[None, :]


def test_examples_are_a_function_of_seed_split_index():
    a = clutter.make_example(3, "train", 17, 0.25)
    assert a == clutter.make_example(3, "train", 17, 0.25)
    image = clutter.render_example(a, 64).tobytes()
    assert image == clutter.render_example(clutter.make_example(3, "train", 17, 0.25), 64).tobytes()
    for other in [(3, "train", 18), (4, "train", 17), (3, "validation", 17)]:
        assert clutter.make_example(*other, 0.25).clutter != a.clutter


def test_described_part_is_the_plain_example():
    for index in range(100):
        plain = shapes.make_example(0, "test", index, 0.25)
        cluttered = clutter.make_example(0, "test", index, 0.25)
        assert cluttered.scene == plain.scene
        assert (cluttered.questions, cluttered.answers) == (plain.questions, plain.answers)
        pairs = zip(plain.captions, cluttered.captions, strict=True)
        differ = [i for i, (a, b) in enumerate(pairs) if a != b]
        assert differ == ([2] if len(plain.scene.shapes) == 1 else [])
        assert "alone" not in " ".join(cluttered.captions)


def test_captions_never_mention_the_clutter():
    words = set(clutter.DISTRACTOR_KINDS) | set(clutter.DISTRACTOR_COLOURS) | set(clutter.TEXTURES)
    seen_kinds = set()
    for index in range(300):
        example = clutter.make_example(0, "train", index, 0.25)
        assert 2 <= len(example.clutter.distractors) <= 4
        seen_kinds |= {d.kind for d in example.clutter.distractors}
        text = " ".join(example.captions + example.questions + example.answers)
        assert not set(re.findall(r"[a-z]+", text)) & words, text
    assert seen_kinds == set(clutter.DISTRACTOR_KINDS)


def test_distractors_use_free_cells_and_coverage_marks_only_described_shapes():
    cells = _cell_of_pixels(64)
    for index in range(30):
        example = clutter.make_example(0, "train", index, 0.25)
        scene, extra = example.scene, example.clutter
        described = {s.cell for s in scene.shapes}
        assert not described & {d.cell for d in extra.distractors}
        image = np.asarray(clutter.render_example(example, 64)).astype(np.int32)
        coverage = shapes.object_masks(scene, 64).sum(0)
        in_distractor_cells = np.isin(cells, [d.cell for d in extra.distractors])
        assert coverage[in_distractor_cells].max() == 0.0
        for d in extra.distractors:  # each distractor is drawn, in its own colour, uncovered
            painted = np.all(image == clutter.DISTRACTOR_COLOURS[d.colour], axis=-1)
            assert (painted & (cells == d.cell)).sum() > 5
        for shape, mask in zip(scene.shapes, shapes.object_masks(scene, 64), strict=True):
            full = mask == 1.0
            np.testing.assert_array_equal(
                image[full], np.broadcast_to(shapes.COLOURS[shape.colour], image[full].shape)
            )


def test_backgrounds_are_textured():
    spreads = {}
    for index in range(60):
        example = clutter.make_example(0, "train", index, 0.25)
        background = clutter.background(example.scene, example.clutter, 64).astype(np.float32)
        spreads.setdefault(example.clutter.texture, []).append(background.std())
    assert set(spreads) == set(clutter.TEXTURES)
    assert min(min(v) for v in spreads.values()) > 2.0  # every texture varies


def test_held_out_pairs_stay_in_the_compositional_test_scenes():
    held_out = {f"{c} {k}" for c, k in shapes.HELD_OUT}
    for index in range(300):
        train = clutter.make_example(0, "train", index, 0.25).scene
        assert not {s.name for s in train.shapes} & held_out
        test = clutter.make_example(0, "test", index, 0.25).scene
        assert (test.main.name in held_out) == test.compositional


def test_config_names_round_trip():
    config = shapes_builder.config_from_name("sycoca_shapes/clutter")
    assert config.clutter and config.name == "clutter_64px_train20000_val1000_test2000_seed0"
    again = shapes_builder.config_from_name(f"sycoca_shapes/{config.name}")
    assert (again.name, again.clutter) == (config.name, True)
    small = shapes_builder.shapes_config(32, 4, 2, 3, seed=5, clutter=True)
    parsed = shapes_builder.config_from_name(f"sycoca_shapes/{small.name}")
    assert (parsed.image_size, parsed.num_test, parsed.seed, parsed.clutter) == (32, 3, 5, True)
    assert not shapes_builder.config_from_name("sycoca_shapes").clutter
    with pytest.raises(ValueError, match="clutter"):
        shapes_builder.config_from_name("sycoca_shapes/cluttered")


def test_build_records_regenerate_from_their_ids(tmp_path):
    config = shapes_builder.shapes_config(32, 6, 2, 4, clutter=True)
    source = sources.open_source(f"sycoca_shapes/{config.name}", "test", str(tmp_path))
    assert len(source) == 4
    for record in source:
        split, index = shapes_builder.parse_id(record["id"])
        example = shapes_builder.regenerate(config, split, index)
        assert [c.decode() for c in record["captions"]] == list(example.captions)
        kinds = [clutter.DISTRACTOR_KINDS[k] for k in record["distractors"]["kind"]]
        assert kinds == [d.kind for d in example.clutter.distractors]
        assert clutter.TEXTURES[record["background"]] == example.clutter.texture
        encoded = shapes.encode_png(clutter.render_example(example, 32))
        assert bytes(record["image"]) == encoded
    with pytest.raises(ValueError, match="record id"):
        shapes_builder.parse_id("bogus_12")


def test_distractor_masks_match_the_painted_distractors():
    for index in range(20):
        example = clutter.make_example(0, "validation", index, 0.25)
        image = np.asarray(clutter.render_example(example, 64)).astype(np.int32)
        masks = clutter.distractor_masks(example.clutter, 64)
        assert masks.shape == (len(example.clutter.distractors), 64, 64)
        for distractor, mask in zip(example.clutter.distractors, masks, strict=True):
            full = mask == 1.0
            assert full.sum() > 5
            colour = clutter.DISTRACTOR_COLOURS[distractor.colour]
            np.testing.assert_array_equal(image[full], np.broadcast_to(colour, image[full].shape))
        assert not (masks.sum(0) * shapes.object_masks(example.scene, 64).sum(0)).any()
