"""Multi-process plumbing without a cluster: when jax.distributed is (not) initialised, SIGTERM
agreement between processes, metrics files on object stores (no network: the rewrite path runs
on a local folder)."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

from sycoca_jax import distributed, metrics
from sycoca_jax.train import preemption


# ------------------------------------------------------------------------------ detection
def _slurm(tasks: int) -> dict[str, str]:
    """The variables srun sets in each task of a step."""
    return dict(
        SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n1", SLURM_NTASKS=str(tasks), SLURM_PROCID="0"
    )


@pytest.fixture
def no_pci(tmp_path):
    return str(tmp_path / "no_pci")


def test_a_plain_machine_is_no_cluster(no_pci):
    assert distributed.detect_cluster({"HOME": "/root"}, pci_root=no_pci) is None
    # An interactive SLURM allocation without srun, or a one-task step: one process.
    assert distributed.detect_cluster(_slurm(1), pci_root=no_pci) is None
    assert distributed.detect_cluster({"SLURM_JOB_ID": "7"}, pci_root=no_pci) is None
    single_rank = {"OMPI_MCA_orte_hnp_uri": "1;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "1"}
    assert distributed.detect_cluster(single_rank, pci_root=no_pci) is None


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, "environment"),
        (_slurm(16), "slurm"),
        ({"OMPI_MCA_orte_hnp_uri": "1;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "gke_tpu"),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "2"}, "kubernetes"),
    ],
)
def test_clusters_are_detected(environ, expected, no_pci):
    assert distributed.detect_cluster(environ, pci_root=no_pci) == expected


def test_a_cloud_tpu_vm_is_detected_by_its_pci_vendor(tmp_path):
    device = tmp_path / "0000:00:04.0"
    device.mkdir()
    (device / "vendor").write_text("0x1ae0\n")
    assert distributed.detect_cluster({}, pci_root=str(tmp_path)) == "cloud_tpu"
    (device / "vendor").write_text("0x8086\n")
    assert distributed.detect_cluster({}, pci_root=str(tmp_path)) is None


# -------------------------------------------------------------------------------- initialise
@pytest.fixture
def calls(monkeypatch):
    """Records jax.distributed.initialize calls instead of making them."""
    made = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
    return made


def test_a_plain_run_initialises_nothing(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda *a: False)
    assert distributed.initialize(distributed.DistributedOptions(), environ={}) is False
    assert distributed.initialize(distributed.DistributedOptions(mode="off")) is False
    assert calls == []


def test_explicit_coordinator(calls):
    options = distributed.DistributedOptions(
        coordinator_address="localhost:1234", num_processes=2, process_id=1
    )
    assert distributed.initialize(options, environ={}) is True
    assert calls == [
        dict(
            coordinator_address="localhost:1234",
            num_processes=2,
            process_id=1,
            initialization_timeout=300,
        )
    ]


def test_detected_clusters_let_jax_fill_in_everything(calls):
    options = distributed.DistributedOptions(local_device_ids=(0, 1, 2, 3))
    assert distributed.initialize(options, environ=_slurm(2)) is True
    assert calls == [dict(initialization_timeout=300, local_device_ids=[0, 1, 2, 3])]


def test_on_insists_even_without_a_detected_cluster(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda *a: False)
    distributed.initialize(distributed.DistributedOptions(mode="on"), environ={})
    assert calls == [dict(initialization_timeout=300)]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(coordinator_address="h:1"), "missing --num_processes, --process_id"),
        (dict(num_processes=2, process_id=0), "missing --coordinator_address"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"\[0, --num_proc"),
        (dict(mode="off", coordinator_address="h:1"), "contradicts"),
        (dict(mode="maybe"), "must be one of"),
    ],
)
def test_incomplete_flags_name_what_is_missing(calls, options, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(distributed.DistributedOptions(**options), environ={})
    assert calls == []


def test_failures_say_how_to_run_without_a_cluster(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)

    def refuse(**kwargs):
        raise RuntimeError("coordinator unreachable")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    with pytest.raises(RuntimeError, match="--distributed=off"):
        distributed.initialize(distributed.DistributedOptions(mode="on"), environ={})


# ------------------------------------------------------------------------------- StopSignal
def test_one_process_stops_on_its_own_sigterm_without_collectives(monkeypatch):
    def no_collectives(*args):
        raise AssertionError("a single process must not gather anything")

    monkeypatch.setattr(preemption.multihost_utils, "process_allgather", no_collectives)
    monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", no_collectives)
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopSignal() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) == before


def test_several_processes_stop_at_the_step_jax_agrees_on(monkeypatch):
    """JAX's preemption sync manager owns SIGTERM then: no Python handler, and should_stop turns
    True exactly at its sync step."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption, "preemption_service_enabled", lambda: True)
    asked = []

    def sync_point(step):
        asked.append(step)
        return step == 7

    monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", sync_point)
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == before
        assert [stop.should_stop(s) for s in range(5, 9)] == [False, False, True, False]
    assert asked == [5, 6, 7, 8]


def test_without_the_preemption_service_the_flag_is_gathered(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption, "preemption_service_enabled", lambda: False)
    other_process_flag = [0]

    def gather(value):
        return np.asarray([int(value), other_process_flag[0]])

    monkeypatch.setattr(preemption.multihost_utils, "process_allgather", gather)
    with preemption.StopSignal() as stop:
        assert not stop.should_stop(1)
        other_process_flag[0] = 1  # SIGTERM reached only the other process
        assert stop.should_stop(2)


def test_the_preemption_service_is_read_from_jax_public_config():
    assert preemption.preemption_service_enabled()  # JAX's default
    jax.config.update("jax_enable_preemption_service", False)
    try:
        assert not preemption.preemption_service_enabled()
    finally:
        jax.config.update("jax_enable_preemption_service", True)


def test_validation_batches_are_skipped_only_when_some_process_has_padding(monkeypatch):
    assert preemption.all_processes_agree(True)
    assert not preemption.all_processes_agree(False)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(
        preemption.multihost_utils, "process_allgather", lambda v: np.asarray([int(v), 0])
    )
    assert not preemption.all_processes_agree(True)  # the other process is padded


# ---------------------------------------------------------------------- metrics on GCS/S3
def test_object_store_paths_are_recognised():
    assert metrics.is_object_store("gs://bucket/run")
    assert metrics.is_object_store("s3://bucket/run")
    assert not metrics.is_object_store("/tmp/run")


def test_where_files_cannot_be_appended_no_record_is_lost(tmp_path):
    """gcsfs turns append mode into overwrite: the writer adds new part objects instead, and
    keeps those a previous run (before a resume) wrote."""
    first = metrics.MetricWriter(str(tmp_path), enabled=True, tensorboard=False, appendable=False)
    first.write(1, {"loss": 3.0})
    first.write(2, {"loss": 2.5})
    first.close()
    resumed = metrics.MetricWriter(str(tmp_path), enabled=True, tensorboard=False, appendable=False)
    resumed.write(3, {"loss": float("nan")})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(str(tmp_path))] == [
        (1, 3.0),
        (2, 2.5),
        (3, None),
    ]


def test_tensorboard_on_gcs_without_its_client_falls_back_to_jsonl(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    assert metrics._summary_writer("gs://bucket/run/tensorboard") is None


def test_other_processes_touch_no_file():
    writer = metrics.MetricWriter("gs://bucket/never-reached", enabled=False)
    writer.write(1, {"loss": 1.0})  # would need the network if it wrote
    writer.close()
