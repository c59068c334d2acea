"""What the store lock records of its holder, and how a refusal names it (no Prefect run:
the flow run's part is in tests/flows/test_run_identity.py)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from tasks.lock import Holder, StoreLockedError, lock_path, read_holder, store_lock

RUN_ID = "0c1e5d3a-8a44-4d57-9a43-5b0e1c7a9f12"


def _holder(**changes: object) -> Holder:
    fields = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": "ana",
        "started": "2026-12-02T15:00:00+00:00",
        "process_started": psutil.Process().create_time(),
        "token": "theirs",
    }
    return Holder(**(fields | changes))


def _plant(store: Path, holder: Holder, *, drop: tuple[str, ...] = ()) -> None:
    data = {key: value for key, value in asdict(holder).items() if key not in drop}
    lock_path(store).parent.mkdir(parents=True, exist_ok=True)
    lock_path(store).write_text(json.dumps(data))


def test_a_holder_in_a_flow_run_is_named_by_that_run_beside_pid_and_host() -> None:
    holder = _holder(flow_run_name="nightly-otter", flow_run_id=RUN_ID)
    assert holder.describe() == (
        f"pid {os.getpid()} on host {socket.gethostname()} (user ana), "
        f"flow run 'nightly-otter' (id {RUN_ID}), since 2026-12-02T15:00:00+00:00"
    )
    assert "flow run" not in _holder().describe()  # no run: no empty "flow run '' (id )"


def test_a_refusal_names_the_holding_flow_run(tmp_path: Path) -> None:
    store = tmp_path / "results" / "run.zarr"
    _plant(store, _holder(flow_run_name="nightly-otter", flow_run_id=RUN_ID))
    with pytest.raises(StoreLockedError) as info, store_lock(store):
        pass
    message = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert f"flow run 'nightly-otter' (id {RUN_ID})" in message
    assert read_holder(store).flow_run_id == RUN_ID  # the holder's lock is left alone


def test_a_lock_file_without_the_flow_run_still_names_its_holder(tmp_path: Path) -> None:
    """Lock files written before the flow run was recorded: read, and refused by."""
    store = tmp_path / "run.zarr"
    _plant(store, _holder(), drop=("flow_run_name", "flow_run_id"))
    holder = read_holder(store)
    assert holder == _holder()
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on host"):
        with store_lock(store):
            pass


def test_the_record_outside_a_flow_run_has_no_flow_run(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    with store_lock(store) as holder:
        data = json.loads(lock_path(store).read_text())
    assert (holder.flow_run_name, holder.flow_run_id) == (None, None)
    assert data["flow_run_name"] is None and data["flow_run_id"] is None
