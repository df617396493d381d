"""The shapes generator (scene invariants, captions that are true) and its TFDS build."""

from __future__ import annotations

import io
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from sycoca_jax.data import shapes, shapes_builder, sources
from tests.helpers import SMALL, SMALL_NAME


def _examples(split: str, n: int):
    return [
        shapes.make_example(0, split, i, shapes_builder.COMPOSITIONAL_FRACTION) for i in range(n)
    ]


def test_examples_are_a_function_of_seed_split_index():
    a = shapes.make_example(3, "train", 17, 0.25)
    b = shapes.make_example(3, "train", 17, 0.25)
    assert a == b
    assert shapes.render(a.scene, 64).tobytes() == shapes.render(b.scene, 64).tobytes()
    assert shapes.make_example(3, "train", 18, 0.25) != a
    assert shapes.make_example(4, "train", 17, 0.25) != a


def test_scene_invariants():
    for example in _examples("train", 500):
        scene = example.scene
        assert 1 <= len(scene.shapes) <= 3
        assert len({s.cell for s in scene.shapes}) == len(scene.shapes)
        assert len({s.name for s in scene.shapes}) == len(scene.shapes)
        main_rank = shapes.SIZES.index(scene.main.size)
        assert all(shapes.SIZES.index(s.size) < main_rank for s in scene.shapes[1:])
        assert shapes.CLASS_NAMES[scene.label] == scene.main.name


def test_held_out_pairs_only_in_marked_test_scenes():
    held_out = {f"{c} {k}" for c, k in shapes.HELD_OUT}
    for split in ("train", "validation"):
        for example in _examples(split, 600):
            assert not {s.name for s in example.scene.shapes} & held_out
            assert not example.scene.compositional
    test = _examples("test", 600)
    marked = [e for e in test if e.scene.compositional]
    assert 0.15 < len(marked) / len(test) < 0.35
    for example in test:
        main_held_out = example.scene.main.name in held_out
        assert main_held_out == example.scene.compositional
        assert not {s.name for s in example.scene.shapes[1:]} & held_out


def test_captions_and_answers_are_true():
    relations = {
        "to the left of": (0, -1),
        "to the right of": (0, 1),
        "above": (-1, 0),
        "below": (1, 0),
    }
    for example in _examples("train", 300):
        scene, main = example.scene, example.scene.main
        assert len(example.captions) == shapes.NUM_CAPTIONS == len(set(example.captions))
        for caption in example.captions:
            assert main.colour in caption and main.kind in caption
        assert f"{main.size} {main.name}" in example.captions[0]
        assert example.captions[1].startswith(shapes.NUMBER_WORDS[len(scene.shapes)])
        # The relation caption: "<main> <relation> <other>" must hold on the grid.
        for phrase, (sign_row, sign_col) in relations.items():
            if f" {phrase} " in example.captions[2]:
                other_name = example.captions[2].split(f" {phrase} ")[1].split(" ", 1)[1]
                other = next(s for s in scene.shapes if s.name == other_name)
                (r0, c0), (r1, c1) = divmod(main.cell, 3), divmod(other.cell, 3)
                assert (c0 - c1) * sign_col > 0 if sign_col else (r0 - r1) * sign_row > 0
        q_colour, q_kind, q_count, q_where = zip(example.questions, example.answers, strict=True)
        assert q_colour[1] == main.colour
        assert q_count[1] == shapes.NUMBER_WORDS[len(scene.shapes)]
        position = q_kind[0].removeprefix("what shape is in the ").removesuffix("?")
        assert q_kind[1] == next(s.kind for s in scene.shapes if s.position == position)
        name = q_where[0].removeprefix("where is the ").removesuffix("?")
        assert q_where[1] == next(s.position for s in scene.shapes if s.name == name)


def test_render_puts_the_main_colour_at_the_main_shape():
    for example in _examples("train", 50):
        scene = example.scene
        pixels = np.asarray(shapes.render(scene, 96), np.int32)
        row, col = divmod(scene.main.cell, 3)
        cell = 96 / 3
        jx, jy = scene.jitter[0]
        slack = cell / 2 - shapes._SIZE_RADIUS[scene.main.size] * cell
        x = int((col + 0.5) * cell + 0.6 * slack * jx)
        y = int((row + 0.5) * cell + 0.6 * slack * jy)
        np.testing.assert_allclose(pixels[y, x], shapes.COLOURS[scene.main.colour], atol=40)


def test_config_names_round_trip():
    assert (
        shapes_builder.config_from_name("sycoca_shapes").name
        == "64px_train20000_val1000_test2000_seed0"
    )
    config = shapes_builder.config_from_name(SMALL_NAME)
    assert (config.image_size, config.num_train, config.num_validation, config.num_test) == (
        64,
        96,
        20,
        40,
    )
    with pytest.raises(ValueError, match="bad sycoca_shapes config"):
        shapes_builder.config_from_name("sycoca_shapes/big")


def test_built_dataset_holds_the_generated_examples(data_dir):
    builder = sources.load_builder(SMALL_NAME, data_dir)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == SMALL.split_sizes()
    assert builder.info.features["label"].names == list(shapes.CLASS_NAMES)
    assert sources.class_names(SMALL_NAME, data_dir) == list(shapes.CLASS_NAMES)
    source = sources.open_source(SMALL_NAME, "test", data_dir)
    ids = set()
    for record in source:
        split, index = record["id"].decode().split("_")
        ids.add(int(index))
        expected = shapes.make_example(
            SMALL.seed, split, int(index), shapes_builder.COMPOSITIONAL_FRACTION
        )
        assert [c.decode() for c in record["captions"]] == list(expected.captions)
        assert [a.decode() for a in record["answers"]] == list(expected.answers)
        assert record["label"] == expected.scene.label
        assert bool(record["compositional"]) == expected.scene.compositional
        assert len(record["objects"]["kind"]) == len(expected.scene.shapes)
        image = Image.open(io.BytesIO(record["image"]))
        assert image.size == (64, 64) and image.mode == "RGB"
    assert ids == set(range(SMALL.num_test))


def test_builders_pickle(tmp_path, data_dir):
    # grain worker processes receive data sources, which carry their builder, by pickle.
    default = shapes_builder.SycocaShapes(data_dir=str(tmp_path))
    assert pickle.loads(pickle.dumps(default)).builder_config.num_train == 20_000
    small = sources.open_source(SMALL_NAME, "validation", data_dir)
    assert pickle.loads(pickle.dumps(small))[0]["id"] == small[0]["id"]


def test_second_prepare_reuses_the_files(data_dir):
    start = time.perf_counter()
    shapes_builder.prepare(SMALL, data_dir)
    assert time.perf_counter() - start < 2.0
