"""One run per workdir: a lease file, refreshed while the run lives.

``<workdir>/workdir_lease.json`` holds the run's id, host, pid, start time and the last time it
was refreshed (a background thread rewrites it every ``refresh_every_s``). A second run finds the
lease and stops with one line saying which run holds the workdir and what to do. A lease is
taken over when its holder is certainly gone (same host, and that pid is dead or now another
process), when it has not been refreshed for ``stale_after_s`` (host clocks must agree to well
within that; NTP does), or with ``force``.

Creating the lease:
  * local disks: the lease is written to a temporary file and hard-linked into place, which
    fails if a lease exists: atomic, and a reader never sees a half-written lease.
  * object stores (gs://, through ``etils.epath``, which offers no create-if-absent): write,
    wait ``settle_s``, read back. Of two runs starting together the later write wins and the
    other sees it on reading back, unless a write takes longer than ``settle_s`` to land (the
    race window). A takeover of a stale lease is written the same way on both kinds of storage.
  * either way the refresh thread reads the lease before rewriting it: a run whose lease now
    names another run knows it lost the workdir (``lost``; ``check()`` raises), the safety net
    for the windows above and for ``force`` used on a live run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from sycoca_jax.errors import UserError

LEASE_NAME = "workdir_lease.json"
STALE_AFTER_S = 300.0  # a lease not refreshed for this long belongs to a dead run
REFRESH_EVERY_S = 30.0


class WorkdirInUseError(UserError):
    """Another live run holds the workdir."""


class WorkdirLockLostError(UserError):
    """This run's lease was taken over (``--force_unlock`` elsewhere, or a stale takeover)."""


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (Linux clock ticks since boot): tells the lease's process from a
    later one that reused its pid. None where /proc is not there."""
    try:
        stat = epath.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


@dataclasses.dataclass(frozen=True)
class Lease:
    """Who holds a workdir."""

    run_id: str
    host: str
    pid: int
    pid_started: str | None
    started: float  # unix seconds
    refreshed: float
    stale_after_s: float
    command: str = ""

    @classmethod
    def for_this_process(cls, stale_after_s: float) -> Lease:
        now = time.time()
        return cls(
            run_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=_process_start(os.getpid()),
            started=now,
            refreshed=now,
            stale_after_s=stale_after_s,
            command=" ".join(sys.argv)[:500],
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | None) -> Lease | None:
        """None for a missing or unreadable lease."""
        if not text:
            return None
        try:
            fields = json.loads(text)
            return cls(
                **{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields}
            )
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.refreshed
        return (
            f"run {self.run_id[:8]} (host {self.host}, pid {self.pid}, started "
            f"{_utc(self.started)}, lease refreshed {age:.0f} s ago)"
        )

    def why_takeable(self, now: float | None = None) -> str | None:
        """Why this lease no longer protects a live run, or None if it may."""
        now = time.time() if now is None else now
        if now - self.refreshed > self.stale_after_s:
            return f"not refreshed for {now - self.refreshed:.0f} s (> {self.stale_after_s:.0f} s)"
        if self.host == socket.gethostname():
            if not _pid_alive(self.pid):
                return f"its process {self.pid} on this host has exited"
            started = _process_start(self.pid)
            if self.pid_started and started and started != self.pid_started:
                return f"pid {self.pid} on this host is now another process"
        return None


class _Store:
    """Reading and writing the lease file: atomic create on local disks, write-then-verify on
    object stores."""

    def __init__(self, path: epath.Path, object_store: bool):
        self.path = path
        self.object_store = object_store

    def read(self) -> str | None:
        try:
            return self.path.read_text()
        except (FileNotFoundError, OSError):
            return None

    def _local_temp(self, text: str) -> str:
        temp = f"{os.fspath(self.path)}.{uuid.uuid4().hex}.tmp"
        with open(temp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return temp

    def create(self, text: str) -> bool:
        """Write the lease if there is none; True when written (object stores: verify after)."""
        if self.object_store:
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        temp = self._local_temp(text)
        try:
            os.link(temp, os.fspath(self.path))
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE mounts): exclusive create, then write
            return self._create_exclusive(text)
        finally:
            os.unlink(temp)

    def _create_exclusive(self, text: str) -> bool:
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def replace(self, text: str) -> None:
        if self.object_store:
            self.path.write_text(text)
        else:
            os.replace(self._local_temp(text), os.fspath(self.path))

    def delete(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class WorkdirLock:
    """The lease on one workdir; ``acquire`` takes it (raises ``WorkdirInUseError``), a
    background thread refreshes it, ``release`` (or leaving the ``with`` block) removes it."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        stale_after_s: float = STALE_AFTER_S,
        refresh_every_s: float | None = None,
        settle_s: float | None = None,
        object_store: bool | None = None,
    ):
        from sycoca_jax.metrics import is_object_store

        self.workdir = epath.Path(workdir)
        if object_store is None:
            object_store = is_object_store(workdir)
        self._store = _Store(self.workdir / LEASE_NAME, object_store)
        self.stale_after_s = stale_after_s
        self.refresh_every_s = refresh_every_s or min(REFRESH_EVERY_S, stale_after_s / 10)
        self.settle_s = (2.0 if object_store else 0.05) if settle_s is None else settle_s
        self.lease: Lease | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> epath.Path:
        return self._store.path

    # ---------------------------------------------------------------------------- acquire
    def acquire(self, force: bool = False) -> WorkdirLock:
        """Take the lease, or raise ``WorkdirInUseError`` naming its holder. ``force`` takes it
        from a live holder too (``--force_unlock``: for a holder you know is dead)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        mine = Lease.for_this_process(self.stale_after_s)
        unreadable_before = False
        for _ in range(5):
            if self._store.create(mine.to_json()) and self._verify(mine):
                return self._start(mine)
            text = self._store.read()
            held = Lease.from_json(text)
            if text is None:  # released meanwhile: try again
                continue
            if held is None and not unreadable_before:  # maybe caught mid-write: look again
                unreadable_before = True
                time.sleep(self.settle_s)
                continue
            reason = (
                "--force_unlock" if force else "its lease is unreadable" if held is None else None
            )
            reason = reason or held.why_takeable()
            if reason is None:
                raise WorkdirInUseError(self._in_use_message(held))
            if self._take_over(text, mine):
                who = held.describe() if held else "an unreadable lease"
                logging.warning("took over the workdir lease of %s: %s", who, reason)
                return self._start(mine)
        held = Lease.from_json(self._store.read())
        raise WorkdirInUseError(self._in_use_message(held))

    def _verify(self, mine: Lease) -> bool:
        """Whether the lease still names this run after ``settle_s`` (a concurrent writer's
        lease lands within it)."""
        time.sleep(self.settle_s)
        found = Lease.from_json(self._store.read())
        return found is not None and found.run_id == mine.run_id

    def _take_over(self, seen: str, mine: Lease) -> bool:
        if self._store.read() != seen:  # changed since we looked: decide again
            return False
        self._store.replace(mine.to_json())
        return self._verify(mine)

    def _in_use_message(self, held: Lease | None) -> str:
        who = held.describe() if held else "another run"
        return (
            f"workdir {self.workdir} is in use by {who}. Wait for it to finish or use another "
            f"--workdir; if that run is dead, pass --force_unlock (a lease not refreshed for "
            f"{self.stale_after_s:.0f} s is taken over by itself). Lease: {self.path}"
        )

    # ---------------------------------------------------------------------------- refresh
    def _start(self, mine: Lease) -> WorkdirLock:
        self.lease, self.lost = mine, None
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._refresh_loop, name="workdir-lease", daemon=True
        )
        self._thread.start()
        return self

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_every_s):
            try:
                if not self.refresh():
                    return
            except Exception as error:  # a storage hiccup: keep trying until stale
                logging.warning("could not refresh the workdir lease %s: %s", self.path, error)

    def refresh(self) -> bool:
        """Rewrite the lease's refresh time; False (and ``lost`` set) if it names another run."""
        found = Lease.from_json(self._store.read())
        if found is None or self.lease is None or found.run_id != self.lease.run_id:
            who = found.describe() if found else "nobody (deleted)"
            self.lost = f"the lease of workdir {self.workdir} now names {who}"
            logging.error("%s: this run no longer owns its workdir", self.lost)
            return False
        self.lease = dataclasses.replace(self.lease, refreshed=time.time())
        self._store.replace(self.lease.to_json())
        return True

    def check(self) -> None:
        """Raise ``WorkdirLockLostError`` if another run took the lease (call before writing a
        checkpoint)."""
        if self.lost:
            raise WorkdirLockLostError(
                f"{self.lost}; stopping without writing (two runs must not share a workdir)"
            )

    # ---------------------------------------------------------------------------- release
    def release(self) -> None:
        """Stop refreshing and remove the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if self.lease is None:
            return
        found = Lease.from_json(self._store.read())
        if found is not None and found.run_id == self.lease.run_id:
            self._store.delete()
        self.lease = None

    def __enter__(self) -> WorkdirLock:
        return self if self.lease else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold(workdir: str | os.PathLike, force_unlock: bool = False, **options: Any) -> WorkdirLock:
    """Take ``workdir``'s lease (``options``: ``WorkdirLock``'s)."""
    return WorkdirLock(workdir, **options).acquire(force=force_unlock)


class _Follower:
    """What processes other than 0 hold: process 0 owns the lease for the whole run."""

    lost = None

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self) -> _Follower:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


# What a run holds on its workdir: the lease (process 0) or a follower's stand-in.
Held = WorkdirLock | _Follower


def hold_for_run(
    workdir: str | os.PathLike, force_unlock: bool = False, **options: Any
) -> WorkdirLock | _Follower:
    """The lease for a (possibly multi-process) run: process 0 takes it and tells the others,
    so every process stops with the same one-line error when the workdir is busy."""
    import jax

    if jax.process_count() == 1:
        return hold(workdir, force_unlock, **options)
    import numpy as np
    from jax.experimental import multihost_utils

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = hold(workdir, force_unlock, **options)
        except WorkdirInUseError as raised:
            error = raised
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
        raise error
    if not ok:
        raise WorkdirInUseError(
            f"workdir {workdir} is in use by another run (process 0's log names it)"
        )
    return lock if lock is not None else _Follower()
