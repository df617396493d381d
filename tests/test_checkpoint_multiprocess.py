"""Two processes (4 CPU devices each, jax.distributed on localhost): a checkpoint part that only
one process reads is damaged; both processes must agree to fall back to the previous step (each
restoring its own data-iterator position), and the checksums computed across the two processes
must equal those of the same arrays on one host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sycoca_jax import checksums
from tests.helpers import ROOT

_PROCESS = r"""
import json, os, sys
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
import jax
from sycoca_jax import distributed
distributed._use_gloo_for_cpu_collectives()
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import grain
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from sycoca_jax import checkpoint as ckpt, checksums

mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
split, replicated = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())


def state(seed):
    w = np.asarray(np.random.default_rng(seed).normal(size=(256, 64)), np.float32)
    b = np.arange(3.0, dtype=np.float32) + seed
    return {
        "step": jax.make_array_from_callback((), replicated, lambda i: np.int32(seed)),
        "params": {
            "w": jax.make_array_from_callback(w.shape, split, lambda i: w[i]),
            "b": jax.make_array_from_callback(b.shape, replicated, lambda i: b[i]),
        },
    }


def iterator(position):
    it = iter(grain.MapDataset.range(1000)[pid::2].batch(4).to_iter_dataset())
    for _ in range(position):
        next(it)
    return it


checkpointer = ckpt.Checkpointer(workdir, async_save=False)
for step in (1, 2):
    checkpointer.save(step, state(step), iterator(step), {"seed": step})
checkpointer.wait()
sums = checksums.of_tree(state(2))
if pid == 0:
    json.dump(sums, open(os.path.join(workdir, "mp_sums.json"), "w"))
multihost_utils.sync_global_devices("saved")
if pid == 1:  # only process 1 reads this file
    os.remove(os.path.join(workdir, "checkpoints", "2", "data", "process_1-of-2.json"))
multihost_utils.sync_global_devices("damaged")
abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0)
)
resumed = iterator(0)
restored = checkpointer.restore_latest(abstract, resumed)
assert restored.step == 1, restored.step
assert next(resumed).tolist() == next(iterator(1)).tolist()
assert checksums.of_tree(restored.state) == checksums.of_tree(state(1))
checkpointer.close()
print(f"process {pid}: restored step {restored.step}: OK", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_fall_back_together_when_one_cannot_read_its_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(i), port, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
        assert "restored step 1: OK" in out, out
    assert "another process could not read its part" in outputs[0][1]
    # The same arrays on one host give the same checksums.
    w = np.asarray(np.random.default_rng(2).normal(size=(256, 64)), np.float32)
    host = {
        "step": np.asarray(2, np.int32),
        "params": {"w": w, "b": np.arange(3.0, dtype=np.float32) + 2},
    }
    assert checksums.of_tree(host) == json.loads((tmp_path / "mp_sums.json").read_text())
