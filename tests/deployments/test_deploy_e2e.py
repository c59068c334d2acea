"""deployments/prefect.yaml for real: server, process work pool, deploy, worker, flow run.

One Prefect server on a free loopback port (temporary `PREFECT_HOME`, no UI, no scheduler:
nothing but the test creates runs) serves the whole module. Every process is started in
its own session and stopped with its descendants (the worker starts each flow run in a
session of its own) by the fixtures' finalizers, also on failure. Server, deploy and
worker output goes to `*.log` files in the temporary folder, printed when a test fails.

What a Prefect user sees is checked on the runs too: the flow run named after its store,
task runs after their modality, the model's own log lines (read back from the server) in
the run's logs, and (marked `slow`: two more flow runs) artifact keys that keep two stores
apart.

Not marked `slow` (but for the two-store test): it costs ~33 s of CPU in all; on an otherwise idle 2-core machine the
steps took server ~8 s, pool ~2 s, deploy ~4 s, worker + flow run ~11 s (~30-40 s with the
CLI re-deploy), inside the 90 s budget for the default suite, and it is the only check
that the deployments actually run. Every wait has its own generous timeout, so a busy
machine makes it slower (120-150 s at load average 9-10 on 2 cores), not flaky.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import zarr
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, Log
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import PROJECT_ROOT
from tasks.demo import write_demo_inputs
from tasks.orchestration.artifacts import artifact_key, page_artifact_key
from tasks.results.run_page import page_path
from tasks.store import COMPLETE, results_key

#: the end-to-end tier: a real Prefect server and process worker
pytestmark = pytest.mark.slow

PREFECT = [sys.executable, "-m", "prefect"]
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
POOL = "bayesdream-process"
SERVER_START_S = 90
COMMAND_S = 120
FLOW_RUN_S = 180
LOGS_S = 60  # the flow-run process sends its last log batch as it exits
STOP_S = 15
LOG_TAIL_LINES = 150


@dataclass(frozen=True)
class Server:
    """A running Prefect server and the environment that points a process at it."""

    url: str
    env: dict[str, str]
    logs: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(home: Path) -> dict[str, str]:
    """This environment minus any PREFECT_* setting (a user's profile or API must not leak)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return env | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }


def _start(command: list[str], *, log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A background process in its own session (one process group), output into `log`."""
    with log.open("ab") as sink:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    """Stop `process`, its process group and every descendant; SIGKILL what outlives STOP_S."""
    family: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        leader = psutil.Process(process.pid)
        family = [leader, *leader.children(recursive=True)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=STOP_S)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=STOP_S)


def _log_tails(folder: Path) -> str:
    parts = []
    for log in sorted(folder.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        parts.append(f"===== {log.name} (last {len(lines)} lines) =====\n" + "\n".join(lines))
    return "\n".join(parts)


@contextlib.contextmanager
def _logs_on_failure(folder: Path) -> Iterator[None]:
    """Print the server/deploy/worker logs when the block fails (pytest shows them then)."""
    try:
        yield
    except BaseException:
        print(_log_tails(folder))
        raise


def _run(command: list[str], server: Server, *, log: str, cwd: Path = PROJECT_ROOT) -> str:
    """Run a Prefect command against `server` to the end; its output is appended to `log`."""
    done = subprocess.run(
        command,
        cwd=cwd,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=COMMAND_S,
        check=False,
    )
    output = done.stdout + done.stderr
    with (server.logs / log).open("a") as sink:
        sink.write(f"$ {' '.join(command)}  (exit {done.returncode})\n{output}\n")
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"
    return output


def _wait_healthy(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prefect server exited {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    pytest.fail(f"prefect server not healthy after {SERVER_START_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`prefect server start` on a free loopback port, with a temporary PREFECT_HOME."""
    folder = tmp_path_factory.mktemp("prefect")
    env = _base_env(folder / "home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = folder / "server.log"
    command = [
        *PREFECT,
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-ui",
        "--no-scheduler",
        "--analytics-off",
    ]
    process = _start(command, log=log, env=env, cwd=folder)
    try:
        _wait_healthy(process, url, log)
        yield Server(url=url, env=env | {"PREFECT_API_URL": url}, logs=folder)
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def deployed(server: Server) -> Server:
    """The process work pool, then every deployment of prefect.yaml (from the project root)."""
    with _logs_on_failure(server.logs):
        _run([*PREFECT, "work-pool", "create", POOL, "--type", "process"], server, log="pool.log")
        output = _run(
            [*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)],
            server,
            log="deploy.log",
        )
    for name in ("technical-fit/on-demand", "technical-fit/nightly"):
        assert f"Deployment '{name}' successfully created" in output, output
    return server


@pytest.fixture
def client(deployed: Server) -> Iterator[SyncPrefectClient]:
    """A client of the test's server (this process's own Prefect settings are left alone)."""
    with temporary_settings(updates={PREFECT_API_URL: deployed.url}):
        with get_client(sync_client=True) as api:
            yield api


@pytest.fixture
def worker(deployed: Server, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A process worker polling every 2 s, started away from the project root (the pull
    step must take the flow run there); stopped with its flow runs at teardown."""
    env = deployed.env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}
    command = [*PREFECT, "worker", "start", "--pool", POOL, "--type", "process"]
    process = _start(command, log=deployed.logs / "worker.log", env=env, cwd=tmp_path)
    try:
        yield process
    finally:
        _stop(process)


def _wait_final(api: SyncPrefectClient, run_id, worker: subprocess.Popen) -> FlowRun:
    deadline = time.monotonic() + FLOW_RUN_S
    while time.monotonic() < deadline:
        run = api.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert worker.poll() is None, f"the worker exited ({worker.returncode}) mid-run"
        time.sleep(1)
    pytest.fail(f"flow run {run_id} not final after {FLOW_RUN_S} s: {run.state!r}")


def _run_logs(api: SyncPrefectClient, run_id) -> list[Log]:
    """The run's logs once the last one ("Finished in state ...") reached the server."""
    deadline = time.monotonic() + LOGS_S
    while True:
        logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        last = [log for log in logs if log.message.startswith("Finished in state")]
        if any(log.task_run_id is None for log in last) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


def _of_run(run: FlowRun) -> ArtifactFilter:
    return ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))


def _check_what_a_user_sees(api: SyncPrefectClient, run: FlowRun, store: Path) -> None:
    """The flow run is named after its store, its task runs after their modality, and the
    model's own lines (`logging.getLogger(__name__)`, not Prefect's run logger) are in its
    logs on the server, each filed under the task run that emitted it."""
    assert run.name == str(store.resolve())
    tasks = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    names = {task.name for task in tasks}
    assert {"ingest-gene", "filter-features-gene", "fit-gene", "sample-gene"} <= names, names
    model = [log for log in _run_logs(api, run.id) if log.name.startswith("bayesdream_model.")]
    messages = [log.message for log in model]
    assert any(message.startswith("Laplace start") for message in messages), messages
    assert any(message.startswith("SVI stopped after") for message in messages), messages
    assert all(log.task_run_id is not None for log in model)


def test_on_demand_deployment_runs_the_demo_screen(
    deployed: Server, client: SyncPrefectClient, worker: subprocess.Popen, tmp_path: Path
) -> None:
    config = write_demo_inputs(tmp_path, n_cells=200, n_features=20, niters=100, nsamples=20)
    with _logs_on_failure(deployed.logs):
        deployment = client.read_deployment_by_name("technical-fit/on-demand")
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"config": str(config)}
        )
        final = _wait_final(client, run.id, worker)
        assert final.state.is_completed(), f"{final.state.name}: {final.state.message}"
        assert final.parameters == {"config": str(config), "overrides": []}
        root = zarr.open_group(str(tmp_path / "results" / "run.zarr"), mode="r")
        assert root.attrs.get(COMPLETE) is True
        assert results_key("gene") in root
        _check_what_a_user_sees(client, final, tmp_path / "results" / "run.zarr")


def test_nightly_deployment_is_scheduled(deployed: Server, client: SyncPrefectClient) -> None:
    with _logs_on_failure(deployed.logs):
        nightly = client.read_deployment_by_name("technical-fit/nightly")
        (schedule,) = nightly.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
        assert schedule.active
        assert nightly.parameters == {"config": "/data/screen/config.yaml", "overrides": []}
        assert nightly.work_pool_name == POOL
        assert nightly.entrypoint == "flows/technical_fit.py:technical_fit"
        directory = nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
        assert Path(directory["directory"]) == PROJECT_ROOT
        # another config for the cron runs without editing prefect.yaml (deployments/README)
        other = {"config": "/data/other/config.yaml", "overrides": []}
        try:
            client.update_deployment(nightly.id, DeploymentUpdate(parameters=other))
            assert client.read_deployment(nightly.id).parameters == other
        finally:
            client.update_deployment(nightly.id, DeploymentUpdate(parameters=nightly.parameters))


def test_cli_deploy_registers_a_named_deployment(deployed: Server, tmp_path: Path) -> None:
    """`bayesdream deploy` from anywhere: it runs Prefect's deploy from the project root."""
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "deploy",
        str(PREFECT_FILE),
        "--name",
        "technical-fit/on-demand",
    ]
    with _logs_on_failure(deployed.logs):
        output = _run(command, deployed, log="cli-deploy.log", cwd=tmp_path)
    assert "Deployment 'technical-fit/on-demand' successfully created" in output
    assert "technical-fit/nightly" not in output


@pytest.mark.slow
def test_runs_on_two_stores_keep_their_artifacts_apart(
    deployed: Server, client: SyncPrefectClient, worker: subprocess.Popen, tmp_path: Path
) -> None:
    """Two stores, one modality name: each run's artifacts carry its own store's key, so
    neither overwrites the other's latest report (as `report-gene` for both did); each
    run's page is written by the worker and linked from its run."""
    configs = [
        write_demo_inputs(tmp_path / screen, n_cells=120, n_features=10, niters=60, nsamples=10)
        for screen in ("screen-a", "screen-b")
    ]
    with _logs_on_failure(deployed.logs):
        deployment = client.read_deployment_by_name("technical-fit/on-demand")
        runs = [
            client.create_flow_run_from_deployment(deployment.id, parameters={"config": str(c)})
            for c in configs
        ]
        for config, run in zip(configs, runs, strict=True):
            final = _wait_final(client, run.id, worker)
            assert final.state.is_completed(), f"{final.state.name}: {final.state.message}"
            _check_what_a_user_sees(client, final, config.parent / "results" / "run.zarr")
        for config, run in zip(configs, runs, strict=True):
            # every artifact of this store's key is this run's: nobody else wrote one
            key = artifact_key("report", "gene", store=config.parent / "results" / "run.zarr")
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
            assert [artifact.flow_run_id for artifact in found] == [run.id], key
        first, second = (
            {artifact.key for artifact in client.read_artifacts(artifact_filter=_of_run(run))}
            for run in runs
        )
        assert len(first) == len(second) == 5 and not first & second, (first, second)
        for config, keys in zip(configs, (first, second), strict=True):
            # the worker's run wrote the store's page, and its artifact links it
            store = config.parent / "results" / "run.zarr"
            assert page_artifact_key(store) in keys
            [link] = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[page_artifact_key(store)])
                )
            )
            assert page_path(store).resolve().as_uri() in link.data
            assert page_path(store).read_text().startswith("<!DOCTYPE html>")
