"""Pictures of attentive masking: decodable PNGs whose overlays show the chosen patches."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from sycoca_jax.models import pixels as model_pixels
from sycoca_jax.tools import pictures
from tests.helpers import one_error_line, run_module

SIZE, PATCH = 16, 4  # a 4x4 grid of patches


def _image(rng):
    return rng.normal(size=(SIZE, SIZE, 3)).astype(np.float32)


def _patch(array, index):
    row, col = divmod(index, SIZE // PATCH)
    return array[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]


def _patchify(image):
    g = SIZE // PATCH
    return image.reshape(g, PATCH, g, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)


def test_overlays_show_exactly_the_chosen_patches():
    rng = np.random.default_rng(0)
    image = _image(rng)
    kept_indices, hidden_indices = [0, 5, 6, 15], [1, 2, 9]
    kept = np.isin(np.arange(16), kept_indices)
    hidden = np.isin(np.arange(16), hidden_indices)
    # The prediction of a perfect TG-MIM head: the true patches in norm_pix units.
    patches = _patchify(image)
    target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
        patches.var(-1, keepdims=True) + 1e-6
    )
    prediction = np.where(hidden[:, None], target, 99.0)  # visible predictions must be unused
    row = pictures.panel_rows(
        image[None], rng.random((1, 16)), kept[None], hidden[None], prediction[None], PATCH, 1
    )[0]
    panels = np.split(row, len(pictures.PANELS), axis=1)
    pixels = pictures.to_pixels(image)
    np.testing.assert_array_equal(panels[0], pixels)
    for index in range(16):
        original = _patch(pixels, index).astype(np.float64)
        shown = _patch(panels[2], index).astype(np.float64)
        expected = original if kept[index] else np.round(original * pictures.DIM)
        np.testing.assert_array_equal(shown, expected)
        grey = np.all(_patch(panels[3], index) == pictures.HIDDEN_GREY)
        assert grey == hidden[index] or np.all(original == pictures.HIDDEN_GREY)
        # Hidden patches are rebuilt from the prediction (to within rounding), others copied.
        np.testing.assert_allclose(_patch(panels[4], index), original, atol=1)


def test_uint8_pixels_draw_like_their_normalised_floats():
    """Pipelines hand uint8 pixels over (the model normalises them): the same picture as from
    the normalised floats the model sees, the reconstruction in the model's normalised space."""
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    normalised = np.asarray(model_pixels.normalize(raw))
    hidden = np.isin(np.arange(16), [3, 7])[None]
    prediction = rng.normal(size=(1, 16, PATCH * PATCH * 3)).astype(np.float32)
    args = (rng.random((1, 16)), ~hidden, hidden, prediction, PATCH, 1)
    from_raw = pictures.panel_rows(raw, *args)[0]
    from_floats = pictures.panel_rows(normalised, *args)[0]
    width = SIZE * 4  # image, relevance, kept, hidden: exact; the reconstruction within rounding
    np.testing.assert_array_equal(from_raw[:, :SIZE], raw[0])
    np.testing.assert_array_equal(from_raw[:, :width], from_floats[:, :width])
    np.testing.assert_allclose(from_raw[:, width:], from_floats[:, width:], atol=1)


def test_png_rows_decode_with_their_captions(tmp_path):
    rng = np.random.default_rng(1)
    images = np.stack([_image(rng) for _ in range(2)])
    mask = np.zeros((2, 16), bool)
    rows = pictures.panel_rows(images, rng.random((2, 16)), mask, mask, None, PATCH, scale=3)
    assert rows.shape == (2, SIZE * 3, 5 * SIZE * 3, 3)
    path = tmp_path / "row.png"
    pictures.row_image(rows[0], ["reference: a red circle", "generated: a red"]).save(path)
    decoded = np.asarray(Image.open(path))
    assert decoded.shape[1] == rows.shape[2] and decoded.shape[0] > rows.shape[1]
    top = 14  # the title line
    np.testing.assert_array_equal(decoded[top : top + rows.shape[1]], rows[0])


def test_visualize_writes_the_run_s_selections(tiny_pretrained, tmp_path):
    from sycoca_jax.data import pipeline
    from sycoca_jax.tools import visualize

    _, workdir, _ = tiny_pretrained
    paths = visualize.write_pictures(workdir, out=str(tmp_path), num=3)
    assert [p.name for p in paths] == ["000.png", "001.png", "002.png", "grid.png"]
    first = np.asarray(Image.open(paths[0]).convert("RGB"))
    # The "caption keeps" panel shows the patches the training forward keeps for this image.
    model, context, _ = visualize.load_run(workdir)
    batch = pipeline.make_eval_dataset(context.config, "validation", batch_size=8)[0]
    assert batch["image"].dtype == np.uint8  # drawn as they are
    with context.placement.context():
        views = visualize.masking_views(
            model, context.params, batch["image"], batch["tokens"], jax.random.key(0)
        )
    size, scale = model.image_size, 2
    panel = first[14 : 14 + size * scale : scale, 2 * size * scale : 3 * size * scale : scale]
    expected = pictures.kept_view(batch["image"][0], np.asarray(views["kept"][0]))
    np.testing.assert_array_equal(panel, expected)
    assert 0 < np.asarray(views["kept"][0]).sum() < model.num_patches


@pytest.mark.parametrize("tool", ["visualize", "caption_selection"])
def test_a_workdir_without_checkpoints_is_one_line(tmp_path, tool):
    """Through ``binaries.run_tool``: exit code 1 and one line naming the folder (was a
    traceback)."""
    program = f"sycoca_jax.tools.{tool}"
    result = run_module(program, f"--workdir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"no checkpoint in {tmp_path}/checkpoints" in one_error_line(result, program)


def test_the_tools_refuse_stray_arguments(tmp_path):
    program = "sycoca_jax.tools.visualize"
    result = run_module(program, f"--workdir={tmp_path}", "extra", cwd=tmp_path)
    assert result.returncode == 1
    assert "unexpected arguments: ['extra']" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any work
