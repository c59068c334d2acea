"""What a Prefect user sees of a run, in-process on the session's API: the flow run named
after its store, task runs after their modality, the model's own log lines in the run's
logs, artifact keys per store, and a run refused by the store's lock ending Cancelled with
one message that names the flow run holding the lock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from _children import child_env
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, Log
from prefect.runtime import flow_run

from flows.technical_fit import run_name, technical_fit
from tasks.demo import write_demo_inputs
from tasks.lock import Holder, StoreLockedError, lock_path, read_holder, store_lock
from tasks.orchestration.artifacts import artifact_key, page_artifact_key

HOLDER_NAME = "the-run-holding-the-lock"
PROJECT = Path(__file__).resolve().parents[2]


def _demo(folder: Path) -> Path:
    return write_demo_inputs(folder, n_cells=120, n_features=10, niters=60, nsamples=10)


def _store(config: Path) -> Path:
    return config.parent / "results" / "run.zarr"


def _flow_run(run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _logs(run_id: UUID) -> list[Log]:
    """The run's logs as the server holds them (the API handler sends in batches)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FlowRun]:
    """One demo run through the flow: its config and its flow run, as the server has it."""
    config = _demo(tmp_path_factory.mktemp("identity"))
    state = technical_fit(str(config), return_state=True)
    assert state.is_completed(), state
    return config, _flow_run(state.state_details.flow_run_id)


def test_the_flow_run_is_named_after_its_store(finished: tuple[Path, FlowRun]) -> None:
    config, run = finished
    assert run.name == str(_store(config).resolve())
    assert run_name(str(config), [], "gene") == f"{_store(config).resolve()} [gene]"
    missing = str(config.parent / "missing.yaml")
    assert run_name(missing, [], None) == f"config {missing}"  # never fails the run


def test_task_runs_carry_their_modality(finished: tuple[Path, FlowRun]) -> None:
    _, run = finished
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    names = {task.name for task in tasks}
    for step in ("ingest", "filter-features", "fit", "sample"):
        assert f"{step}-gene" in names, names
    assert {"preflight", "create-store", "assign-groups", "finalize"} <= names


def test_the_models_own_lines_are_in_the_runs_logs(finished: tuple[Path, FlowRun]) -> None:
    _, run = finished
    logs = _logs(run.id)
    model = [log for log in logs if log.name.startswith("bayesdream_model.")]
    assert any(log.message.startswith("SVI stopped after") for log in model), model
    assert any(log.message.startswith("Laplace start") for log in model), model
    # filed under the task run that emitted them, once each
    assert all(log.task_run_id is not None for log in model)
    messages = [(log.name, log.message, log.timestamp) for log in logs]
    assert len(messages) == len(set(messages))


def test_artifact_keys_name_the_store(finished: tuple[Path, FlowRun]) -> None:
    config, run = finished
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    store = _store(config).resolve()
    expected = {
        artifact_key(kind, "gene", store=store)
        for kind in ("fit-progress", "sample-progress", "excluded-features", "report")
    } | {page_artifact_key(store)}
    assert {artifact.key for artifact in found} == expected
    assert all(key.endswith(artifact_key("", "", store=store)) for key in expected)


@flow(name="lock-holder", flow_run_name=HOLDER_NAME)
def _hold_and_run(config: str) -> tuple[Holder | None, object, str | None]:
    """Holds the store's lock as a flow run does, and runs the technical fit (a subflow)
    on the same store twice: for its state, then as a plain call."""
    with store_lock(_store(Path(config))):
        holder = read_holder(_store(Path(config)))
        refused = technical_fit(config, return_state=True)
        try:
            technical_fit(config)
            raised = None
        except StoreLockedError as err:
            raised = str(err)
    return holder, refused, raised


def test_a_refused_run_ends_cancelled_naming_the_holding_flow_run(tmp_path: Path) -> None:
    config = _demo(tmp_path)
    parent = _hold_and_run(str(config), return_state=True)
    holder, refused, raised = parent.result()
    holder_run = _flow_run(parent.state_details.flow_run_id)
    assert holder is not None
    assert (holder.flow_run_name, holder.flow_run_id) == (HOLDER_NAME, str(holder_run.id))
    assert refused.is_cancelled(), refused
    for message in (refused.message, raised):
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert f"flow run '{HOLDER_NAME}' (id {holder_run.id})" in message
        assert str(lock_path(_store(config))) in message
    logs = _logs(refused.state_details.flow_run_id)
    assert not [log for log in logs if log.level >= 40], [log.message for log in logs]
    assert len([log for log in logs if "is in use by another run" in log.message]) == 1
    assert not _store(config).exists()  # refused before anything was written
    assert not lock_path(_store(config)).exists()  # the holder's lock, released


def test_the_lock_records_no_flow_run_outside_one(tmp_path: Path) -> None:
    assert flow_run.id is None
    with store_lock(tmp_path / "run.zarr") as holder:
        assert (holder.flow_run_name, holder.flow_run_id) == (None, None)


@pytest.mark.slow
def test_the_cli_shows_each_line_once_and_the_run_logs_hold_them(tmp_path: Path) -> None:
    """`bayesdream run` in its own process, against this session's API: every line of the
    model and the tasks is on the terminal once and in the flow run's logs."""
    config = _demo(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(config)],
        capture_output=True,
        text=True,
        env=child_env(tmp_path),
        cwd=PROJECT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    store = str(_store(config).resolve())
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[store]))
        )
    own = [log for log in _logs(run.id) if log.name.split(".")[0] in ("bayesdream_model", "tasks")]
    messages = [log.message for log in own]
    for marker in ("Laplace start", "SVI stopped after"):
        shown = [line for line in done.stderr.splitlines() if marker in line]
        assert len(shown) == 1, done.stderr
        assert any(shown[0].endswith(message) for message in messages), (shown, messages)
    for message in set(messages):
        assert done.stderr.count(message) == messages.count(message), message
