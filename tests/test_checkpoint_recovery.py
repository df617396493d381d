"""A damaged newest checkpoint falls back to the previous step; bit rot is caught by checksums.

A small sharded state (parameters + Adam moments + step) and a grain iterator are saved at steps
1 and 2 by the real Checkpointer; step 2 is then damaged in each way the reliability review
found (a file truncated or deleted, ``_METADATA`` or the OCDBT manifest gone, the data item
missing, the iterator JSON torn, the step folder emptied, 64 bytes of an optimiser-state file
inverted, another step's valid arrays swapped in, the config torn). Restoring must give exactly
step 1's state and iterator position, move step 2 aside, and let the run save step 2 again.
"""

from __future__ import annotations

import pathlib
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sycoca_jax import checkpoint as ckpt
from sycoca_jax import checkpoint_integrity, checksums


def _mesh():
    return jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def _state(seed: int) -> dict:
    """Distinct values per seed: parameters sharded over 8 devices, Adam moments after one
    update, the step counter."""
    mesh = _mesh()
    split, replicated = (
        NamedSharding(mesh, PartitionSpec("d")),
        NamedSharding(mesh, PartitionSpec()),
    )
    key = jax.random.key(seed)
    params = {
        "w": jax.device_put(jax.random.normal(key, (256, 64)), split),
        "b": jax.device_put(jnp.arange(3.0) + seed, replicated),
    }
    tx = optax.adam(1e-3)
    grads = jax.tree.map(lambda x: 0.1 * x + seed, params)
    _, opt_state = tx.update(grads, tx.init(params), params)
    step = jax.device_put(jnp.asarray(seed, jnp.int32), replicated)
    return {"step": step, "params": params, "opt_state": opt_state}


def _abstract(state: dict) -> dict:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _iterator(position: int):
    iterator = iter(grain.MapDataset.range(1000).shuffle(seed=1).batch(4).to_iter_dataset())
    for _ in range(position):
        next(iterator)
    return iterator


def _host(state: dict) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A workdir holding steps 1 and 2 (state, iterator at 1 and 2 batches, config)."""
    workdir = str(tmp_path_factory.mktemp("saved"))
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _state(step), _iterator(step), {"seed": step})
    checkpointer.wait()
    checkpointer.close()
    return workdir


@pytest.fixture
def workdir(saved, tmp_path) -> str:
    copy = tmp_path / "run"
    shutil.copytree(saved, copy)
    return str(copy)


def _step_dir(workdir: str, step: int = 2):
    return pathlib.Path(workdir) / ckpt.CHECKPOINT_DIR / str(step)


def _array_files(workdir: str) -> list[pathlib.Path]:
    """The biggest data file of the state's OCDBT database: the array chunks. Orbax may leave
    an identical copy in the per-process database beside the merged one; both are returned."""
    state = _step_dir(workdir) / "state"
    files = [*(state / "d").glob("*"), *(state / "ocdbt.process_0" / "d").glob("*")]
    size = max(p.stat().st_size for p in files)
    return [p for p in files if p.stat().st_size == size]


def _truncate(path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


def _truncate_array_file(workdir):
    for path in _array_files(workdir):
        _truncate(path, path.stat().st_size // 2)


def _delete_array_file(workdir):
    for path in _array_files(workdir):
        path.unlink()


def _invert_64_bytes(workdir):
    for path in _array_files(workdir):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))


def _empty_step(workdir):
    shutil.rmtree(_step_dir(workdir))
    _step_dir(workdir).mkdir()


def _swap_in_step_1_arrays(workdir):
    """Valid arrays, wrong ones: only the checksums can tell."""
    shutil.rmtree(_step_dir(workdir) / "state")
    shutil.copytree(_step_dir(workdir, 1) / "state", _step_dir(workdir) / "state")


DAMAGE = {
    "file_truncated": _truncate_array_file,
    "file_deleted": _delete_array_file,
    "metadata_gone": lambda w: (_step_dir(w) / "state" / "_METADATA").unlink(),
    "manifest_gone": lambda w: (_step_dir(w) / "state" / "manifest.ocdbt").unlink(),
    "data_item_missing": lambda w: shutil.rmtree(_step_dir(w) / "data"),
    "iterator_json_torn": lambda w: _truncate(_step_dir(w) / "data" / "process_0-of-1.json", 9),
    "empty_step_folder": _empty_step,
    "64_bytes_inverted": _invert_64_bytes,
    "arrays_swapped": _swap_in_step_1_arrays,
    "config_torn": lambda w: _truncate(_step_dir(w) / "config" / "metadata", 3),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_to_the_previous_one(workdir, damage, caplog):
    DAMAGE[damage](workdir)
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    iterator = _iterator(0)
    restored = checkpointer.restore_latest(_abstract(_state(0)), iterator)
    assert restored.step == 1 and restored.config == {"seed": 1}
    for got, want in zip(_host(restored.state), _host(_state(1)), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(next(iterator), next(_iterator(1)))
    lines = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(lines) == 1 and "step 2" in lines[0] and "\n" not in lines[0], lines
    # Step 2 is kept aside, not deleted, and the resumed run can write step 2 again.
    assert list(checkpointer.all_steps()) == [1]
    assert [p.name.split("-")[0] for p in (_step_dir(workdir).parent / "damaged").iterdir()] == [
        "2"
    ]
    checkpointer.save(2, _state(2), _iterator(2), {"seed": 2})
    checkpointer.wait()
    again = checkpointer.restore_latest(_abstract(_state(0)), _iterator(0))
    assert again.step == 2
    checkpointer.close()


def test_flipped_bytes_are_detected_not_restored(workdir):
    """Today's code restored the inverted bytes as values. Now they are caught: by the checksum,
    which names the array, or -- when the middle of a file falls inside a compressed chunk,
    which depends on how the asynchronous write laid the file out -- by the decompressor
    first. Either way nothing is restored (``restore_latest`` treats both as damage; the
    checksum-only path is pinned by the swapped-arrays test below)."""
    _invert_64_bytes(workdir)
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    with pytest.raises(Exception) as error:
        checkpointer.restore(2, _abstract(_state(0)), _iterator(0))
    checkpointer.close()
    if isinstance(error.value, checkpoint_integrity.CheckpointDamagedError):
        assert re.search("checksum mismatch in (opt|params)", str(error.value)), error.value
    else:
        assert re.search("zstd|compress|corrupt", str(error.value), re.I), error.value


def test_swapped_arrays_are_caught_when_loading_parameters_too(workdir):
    _swap_in_step_1_arrays(workdir)
    with pytest.raises(checkpoint_integrity.CheckpointDamagedError, match="params/"):
        ckpt.load_params(workdir, step=2)
    np.testing.assert_array_equal(ckpt.load_params(workdir, step=1)["b"], np.arange(3.0) + 1)


def test_every_step_unreadable_is_an_error_naming_each(workdir):
    for step in (1, 2):
        shutil.rmtree(_step_dir(workdir, step) / "data")
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    with pytest.raises(
        checkpoint_integrity.NoUsableCheckpointError, match=r"step 2: .*data.*; step 1: .*data"
    ):
        checkpointer.restore_latest(_abstract(_state(0)), _iterator(0))
    assert list(checkpointer.all_steps()) == [1, 2]  # nothing moved when nothing restored
    checkpointer.close()


def test_an_empty_workdir_has_nothing_to_restore(tmp_path):
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    assert checkpointer.restore_latest(_abstract(_state(0)), _iterator(0)) is None
    checkpointer.close()


def test_config_check_and_model_mismatch_are_not_damage(workdir):
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)

    def refuse(config):
        raise ValueError(f"refused {config}")

    with pytest.raises(ValueError, match=r"refused \{'seed': 2\}"):
        checkpointer.restore_latest(_abstract(_state(0)), _iterator(0), check_config=refuse)
    wider = _state(0)
    wider["params"]["b"] = jnp.zeros(4)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"b: checkpoint \(3,\)"):
        checkpointer.restore_latest(_abstract(wider), _iterator(0))
    assert list(checkpointer.all_steps()) == [1, 2]
    checkpointer.close()


def test_history_is_saved_with_each_step_and_restored(tmp_path):
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.note({"step": 0, "config_change": {"safe": {"total_steps": [10, 20]}}})
    checkpointer.save(1, _state(1))
    checkpointer.wait()
    checkpointer.close()
    reopened = ckpt.Checkpointer(str(tmp_path), async_save=False)
    assert reopened.history == []
    reopened.restore_latest(_abstract(_state(0)))
    assert reopened.history == [{"step": 0, "config_change": {"safe": {"total_steps": [10, 20]}}}]
    reopened.close()


def test_checksums_do_not_depend_on_the_sharding():
    state = _state(3)
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    resharded = {
        **state,
        "params": {
            "w": jax.device_put(
                state["params"]["w"], NamedSharding(mesh, PartitionSpec(None, "b"))
            ),
            "b": jax.device_put(state["params"]["b"], NamedSharding(mesh, PartitionSpec())),
        },
    }
    host = jax.device_get(state)
    expected = checksums.of_tree(state)
    assert checksums.of_tree(resharded) == expected == checksums.of_tree(host)
    one_bit = jax.tree.map(np.copy, host)
    one_bit["params"]["w"][5, 7] = np.nextafter(one_bit["params"]["w"][5, 7], np.inf)
    assert checksums.mismatches(expected, one_bit) == "params/w"
    swapped = jax.tree.map(np.copy, host)
    swapped["params"]["w"] = swapped["params"]["w"][::-1].copy()
    assert checksums.mismatches(expected, swapped) == "params/w"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8", "uint16", "bool"])
def test_checksums_cover_narrow_dtypes(dtype):
    values = np.arange(64 * 8).reshape(64, 8) % 7
    host = {"x": jnp.asarray(values).astype(dtype)}
    sharded = {"x": jax.device_put(host["x"], NamedSharding(_mesh(), PartitionSpec("d")))}
    expected = checksums.of_tree(host)
    assert checksums.of_tree(sharded) == expected
    changed = {"x": host["x"].at[10, 3].set(host["x"][10, 3] == 0)}
    assert checksums.mismatches(expected, changed) == "x"
