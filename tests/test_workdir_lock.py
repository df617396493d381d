"""One run per workdir: contending processes get exactly one winner (local disk, and the
write-then-verify path used on object stores), the others one line naming the holder; a dead
or stale holder's lease is taken over; --force_unlock takes a live one, and that run learns it
lost the workdir."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time

import pytest

from sycoca_jax import workdir_lock
from sycoca_jax.errors import UserError
from sycoca_jax.workdir_lock import Lease, WorkdirInUseError, WorkdirLock, hold


def _contend(workdir: str, object_store: bool, barrier, results) -> None:
    barrier.wait()
    try:
        lock = hold(workdir, object_store=object_store, settle_s=0.5)
    except WorkdirInUseError as error:
        results.put(("refused", str(error)))
        return
    results.put(("won", os.getpid()))
    time.sleep(2.5)  # longer than any contender's attempt
    lock.release()


@pytest.mark.parametrize("object_store", [False, True], ids=["local", "write_then_verify"])
def test_of_four_processes_starting_together_exactly_one_gets_the_workdir(tmp_path, object_store):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [
        context.Process(target=_contend, args=(str(tmp_path), object_store, barrier, results))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    winners = [value for kind, value in outcomes if kind == "won"]
    refusals = [value for kind, value in outcomes if kind == "refused"]
    assert len(winners) == 1 and len(refusals) == 3, outcomes
    for message in refusals:
        assert "\n" not in message
        assert f"pid {winners[0]}" in message and socket.gethostname() in message
        assert "--force_unlock" in message and "started" in message
    assert not (tmp_path / workdir_lock.LEASE_NAME).exists()  # released on exit


def test_a_second_run_is_refused_in_one_line_and_the_lease_is_removed_on_release(tmp_path):
    with hold(tmp_path, settle_s=0) as lock:
        lease = json.loads((tmp_path / workdir_lock.LEASE_NAME).read_text())
        assert lease["pid"] == os.getpid() and lease["host"] == socket.gethostname()
        assert lease["run_id"] == lock.lease.run_id
        with pytest.raises(WorkdirInUseError, match=r"in use by run \w{8} \(host .*pid") as error:
            hold(tmp_path, settle_s=0)
        assert isinstance(error.value, UserError) and "\n" not in str(error.value)
    assert not (tmp_path / workdir_lock.LEASE_NAME).exists()
    hold(tmp_path, settle_s=0).release()  # free again


def test_the_lease_is_refreshed_while_the_run_lives(tmp_path):
    lock = hold(tmp_path, settle_s=0, refresh_every_s=0.05)
    first = lock.lease.refreshed
    time.sleep(0.4)
    on_disk = Lease.from_json((tmp_path / workdir_lock.LEASE_NAME).read_text())
    assert on_disk.refreshed > first and on_disk.started == lock.lease.started
    lock.release()


def _write_lease(path, **fields) -> Lease:
    lease = Lease.for_this_process(stale_after_s=300)
    lease = Lease(**{**lease.__dict__, "run_id": "f" * 32, **fields})
    (path / workdir_lock.LEASE_NAME).write_text(lease.to_json())
    return lease


def test_a_stale_lease_from_another_host_is_taken_over(tmp_path, caplog):
    _write_lease(tmp_path, host="elsewhere", pid=1, refreshed=time.time() - 301)
    lock = hold(tmp_path, settle_s=0)
    assert lock.lease.run_id != "f" * 32
    assert any("took over" in r.getMessage() and "301" in r.getMessage() for r in caplog.records)
    lock.release()


def test_a_fresh_lease_from_another_host_is_respected(tmp_path):
    _write_lease(tmp_path, host="elsewhere", pid=1, refreshed=time.time() - 200)
    with pytest.raises(WorkdirInUseError, match="host elsewhere, pid 1"):
        hold(tmp_path, settle_s=0)


def _hold_until_killed(workdir: str, ready) -> None:
    hold(workdir, settle_s=0)
    ready.set()
    time.sleep(120)


def test_the_lease_of_a_killed_run_on_this_host_is_taken_over_at_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_hold_until_killed, args=(str(tmp_path), ready))
    child.start()
    assert ready.wait(60)
    with pytest.raises(WorkdirInUseError, match=f"pid {child.pid}"):
        hold(tmp_path, settle_s=0)
    os.kill(child.pid, signal.SIGKILL)  # kill -9: no release
    child.join()
    assert (tmp_path / workdir_lock.LEASE_NAME).exists()
    lock = hold(tmp_path, settle_s=0)  # no waiting for the stale timeout
    assert lock.lease.pid == os.getpid()
    lock.release()


def test_a_reused_pid_does_not_keep_a_lease_alive(tmp_path):
    """Our own pid, but the lease says it started at another time: another process."""
    _write_lease(tmp_path, pid=os.getpid(), pid_started="1")
    lock = hold(tmp_path, settle_s=0)
    lock.release()


def _hold_and_report_loss(workdir: str, ready, results) -> None:
    lock = hold(workdir, settle_s=0, refresh_every_s=0.1)
    ready.set()
    deadline = time.time() + 60
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    try:
        lock.check()
        results.put("not lost")
    except workdir_lock.WorkdirLockLostError as error:
        results.put(str(error))
    lock.release()


def test_force_unlock_takes_a_live_lease_and_its_holder_learns_it(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    child = context.Process(target=_hold_and_report_loss, args=(str(tmp_path), ready, results))
    child.start()
    assert ready.wait(60)
    lock = hold(tmp_path, force_unlock=True, settle_s=0.3)
    message = results.get(timeout=60)
    child.join(timeout=60)
    assert f"run {lock.lease.run_id[:8]}" in message
    assert "stopping without writing" in message
    # The child's release left our lease alone.
    assert Lease.from_json((tmp_path / workdir_lock.LEASE_NAME).read_text()) == lock.lease
    lock.release()


def test_an_unreadable_lease_is_taken_over(tmp_path):
    (tmp_path / workdir_lock.LEASE_NAME).write_text("{not json")
    lock = hold(tmp_path, settle_s=0)
    assert Lease.from_json((tmp_path / workdir_lock.LEASE_NAME).read_text()) == lock.lease
    lock.release()


def test_one_process_run_holds_the_lease_itself(tmp_path):
    lock = workdir_lock.hold_for_run(str(tmp_path), settle_s=0)
    assert isinstance(lock, WorkdirLock) and lock.lease is not None
    lock.release()
