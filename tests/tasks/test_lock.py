"""The store lock: one holder, refusals that name it, stale locks taken over."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import tasks.lock
from tasks.lock import (
    STALE_AFTER_S,
    UNREADABLE_GRACE_S,
    StoreLockedError,
    lock_path,
    read_holder,
    refuse_if_locked,
    store_lock,
)


def _plant(store: Path, **fields: object) -> Path:
    """A lock file as another run would have written it."""
    data = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": "someone",
        "started": "2026-12-01T00:00:00+00:00",
        "process_started": psutil.Process().create_time(),
        "token": "theirs",
    } | fields
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_one_holder_and_the_second_is_refused_naming_it(tmp_path: Path) -> None:
    store = tmp_path / "results" / "run.zarr"
    with store_lock(store) as holder:
        assert lock_path(store).is_file() and not store.exists()  # beside, not in, the store
        assert read_holder(store) == holder
        with pytest.raises(StoreLockedError) as info, store_lock(store):
            pass
        message = str(info.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert str(lock_path(store)) in message
        with pytest.raises(StoreLockedError):
            refuse_if_locked(store)
    assert not lock_path(store).exists()
    refuse_if_locked(store)  # free again
    with store_lock(store):
        pass


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "run.zarr"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _plant(store, pid=gone.pid, process_started=time.time() - 5)
    refuse_if_locked(store)  # stale: not a refusal
    with caplog.at_level(logging.WARNING, logger="tasks.lock"), store_lock(store) as holder:
        assert read_holder(store).token == holder.token
    assert any(
        f"pid {gone.pid}" in r.getMessage() and "no longer running" in r.getMessage()
        for r in caplog.records
    )


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    _plant(store, process_started=psutil.Process().create_time() - 3600)  # before this process
    with store_lock(store) as holder:
        assert read_holder(store).token == holder.token


def test_another_hosts_lock_holds_until_its_heartbeat_stops(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    path = _plant(store, host="node-17.cluster", pid=1)
    with pytest.raises(StoreLockedError, match="pid 1 on host node-17.cluster"):
        refuse_if_locked(store)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))
    with store_lock(store) as holder:
        assert read_holder(store).token == holder.token


def test_an_unreadable_lock_is_respected_briefly_then_taken_over(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    path = lock_path(store)
    path.write_text("")  # created, not yet written by its taker
    with pytest.raises(StoreLockedError, match="a run that is taking the lock now"):
        refuse_if_locked(store)
    old = time.time() - UNREADABLE_GRACE_S - 5
    os.utime(path, (old, old))
    with store_lock(store):
        pass
    assert not path.exists()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    with store_lock(store):
        _plant(store, token="replaced")  # someone deleted ours and took it
    assert read_holder(store).token == "replaced"


RUN = contextvars.ContextVar("run", default=None)


def test_the_heartbeats_warning_is_logged_in_the_lock_takers_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Log handlers that file lines by a context variable (Prefect's run logs) see the
    run that took the lock in the heartbeat thread's warning, not an empty context."""
    monkeypatch.setattr(tasks.lock, "HEARTBEAT_S", 0.05)
    seen: list[object] = []

    class ByContext(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "removed or replaced" in record.getMessage():
                seen.append(RUN.get())

    handler = ByContext()
    logging.getLogger("tasks.lock").addHandler(handler)
    store = tmp_path / "run.zarr"
    token = RUN.set("run-1")
    try:
        with store_lock(store):
            lock_path(store).unlink()  # another run's doing
            deadline = time.monotonic() + 5.0
            while not seen and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        RUN.reset(token)
        logging.getLogger("tasks.lock").removeHandler(handler)
    assert seen == ["run-1"]
