"""One temporary Prefect API (SQLite) for every flow test of the session."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _children import Child

# Set before Prefect's settings are read: no telemetry ("database is locked" tracebacks).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> Iterator[None]:
    """Start the test harness once (~6 s); each flow run then costs about a second."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start flow runs in child processes; any still running at the end are killed."""
    started: list[Child] = []

    def start(config: Path, overrides: list[str]) -> Child:
        started.append(Child(config, overrides, tmp_path, len(started)))
        return started[-1]

    yield start
    for running in started:
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(timeout=30)
