"""One writer per store: a lock file beside the store, naming the run that holds it.

Scheduled and manual runs meet: a nightly deployment and a `bayesdream run` by hand, or
two CLI runs, must not write the same groups at once. A run takes `<store>.lock` with an
exclusive create (atomic on local and network file systems), writes who holds it (host,
pid, user, start time, a token, and the Prefect flow run's name and id when a flow run
takes it) and touches it every `HEARTBEAT_S` while it runs. A second run finds the file
and refuses at once, naming the holder. A lock whose holder is gone is taken over, with a
warning: on the same host, when its pid no longer runs (or now belongs to a process
started after the lock); from another host, when its heartbeat is older than
`STALE_AFTER_S`. The lock is a sibling of the store, not a file in it, so that the store
holds nothing but its Zarr hierarchy.
"""

from __future__ import annotations

import contextlib
import contextvars
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from tasks.errors import StoreError
from tasks.filesystem import store_faults

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # another host's lock without a heartbeat for this long is stale
UNREADABLE_GRACE_S = 60.0  # a lock file still being written by its taker


class StoreLockedError(StoreError):
    """The store is being written by another run."""


@dataclass(frozen=True)
class Holder:
    """Who holds a store's lock."""

    host: str
    pid: int
    user: str
    started: str  # ISO 8601, UTC
    process_started: float  # the holder process's creation time (pid reuse test)
    token: str
    # the Prefect flow run holding the lock (None outside one, and in older lock files)
    flow_run_name: str | None = None
    flow_run_id: str | None = None

    def describe(self) -> str:
        """'pid 4242 on host gpu01 (user ana), flow run 'nightly-otter' (id 0c1e...), since
        2026-12-02T15:00:00+00:00' (without the flow run when none holds the lock)."""
        run = (
            f", flow run '{self.flow_run_name}' (id {self.flow_run_id})"
            if self.flow_run_id is not None
            else ""
        )
        return f"pid {self.pid} on host {self.host} (user {self.user}){run}, since {self.started}"


def lock_path(store: Path) -> Path:
    """`results/run.zarr` -> `results/run.zarr.lock`."""
    return store.with_name(store.name + ".lock")


def read_holder(store: Path) -> Holder | None:
    """The current holder, or None when the lock is absent or unreadable."""
    try:
        data = json.loads(lock_path(store).read_text())
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_reason(store: Path, holder: Holder | None) -> str | None:
    """Why the lock on `store` no longer protects a live run, or None while it does."""
    path = lock_path(store)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if holder is None:
        return f"it is unreadable and {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
    if holder.host == socket.gethostname():
        try:
            process = psutil.Process(holder.pid)
            started, zombie = process.create_time(), process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            started, zombie = None, True
        if zombie:
            return f"its process (pid {holder.pid}) is no longer running"
        if started > holder.process_started + 1.0:
            return f"pid {holder.pid} now belongs to a process started after the lock"
        return None
    if age > STALE_AFTER_S:
        return f"its heartbeat from host {holder.host} stopped {age:.0f} s ago"
    return None


def refuse_if_locked(store: Path) -> None:
    """Raise `StoreLockedError` when a live run holds `store` (a check, takes nothing)."""
    if not lock_path(store).exists():
        return
    holder = read_holder(store)
    if stale_reason(store, holder) is None:
        raise _locked(store, holder)


def _locked(store: Path, holder: Holder | None) -> StoreLockedError:
    who = holder.describe() if holder is not None else "a run that is taking the lock now"
    return StoreLockedError(
        f"Store '{store}' is in use by another run: {who} (lock file '{lock_path(store)}'). "
        "Wait for that run to finish, or give this run another `store:`; if that run is "
        "gone for good, delete the lock file."
    )


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[Holder]:
    """Hold the lock on `store` for the body; refuse at once when another run holds it.

    A disk-full, quota, read-only or permission fault met under the lock (taking the lock
    file, or any write of the run's steps) comes out, once the lock is given back, as one
    `StoreWriteError` that names the store and what the run needs: every run that writes
    the store, from the CLI or a deployment, writes it under this lock."""
    with store_faults(Path(store)):
        holder = _acquire(Path(store))
        stop = threading.Event()
        # in a copy of the caller's context: a warning of the heartbeat's is logged under
        # the run that holds the lock (Prefect files log lines by the run in the context)
        context = contextvars.copy_context()
        beat = threading.Thread(
            target=context.run,
            args=(_heartbeat, Path(store), holder, stop),
            daemon=True,
            name="store-lock",
        )
        beat.start()
        try:
            yield holder
        finally:
            stop.set()
            beat.join(timeout=5.0)
            _release(Path(store), holder)


def _acquire(store: Path) -> Holder:
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    mine = Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        user=_user(),
        started=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        process_started=psutil.Process().create_time(),
        token=uuid.uuid4().hex,
        **_flow_run(),
    )
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(store)
            reason = stale_reason(store, holder)
            if reason is None:
                raise _locked(store, holder) from None
            _take_over(store, holder, reason)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(mine), handle)
            handle.flush()
            os.fsync(handle.fileno())
        return mine
    raise _locked(store, read_holder(store))


def _take_over(store: Path, holder: Holder | None, reason: str) -> None:
    """Move a stale lock aside (one taker wins the rename), with a warning."""
    path = lock_path(store)
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run took it over first; try again
    aside.unlink(missing_ok=True)
    who = holder.describe() if holder is not None else "an unknown run"
    logger.warning(
        "Store '%s': took over the lock of %s, since %s; its work is not in this run, "
        "and steps it left unfinished will be redone.",
        store,
        who,
        reason,
    )


def _heartbeat(store: Path, holder: Holder, stop: threading.Event) -> None:
    """Touch the lock file while the run lasts (another host's staleness test)."""
    while not stop.wait(HEARTBEAT_S):
        current = read_holder(store)
        if current is None or current.token != holder.token:
            logger.warning(
                "Store '%s': the lock file was removed or replaced by another run", store
            )
            return
        with contextlib.suppress(OSError):
            os.utime(lock_path(store))


def _release(store: Path, holder: Holder) -> None:
    """Remove the lock, if it is still ours."""
    current = read_holder(store)
    if current is not None and current.token == holder.token:
        lock_path(store).unlink(missing_ok=True)


def _flow_run() -> dict[str, str]:
    """The Prefect flow run taking the lock, from its run context (no API call); empty
    outside a flow run (Prefect not even imported: the CLI's early check)."""
    if "prefect" not in sys.modules:
        return {}
    from prefect.context import FlowRunContext

    run = getattr(FlowRunContext.get(), "flow_run", None)
    if run is None:
        return {}
    return {"flow_run_name": run.name, "flow_run_id": str(run.id)}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
