"""Flow tests: the session's Prefect API for each; child processes for runs killed mid-way."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _children import Child


@pytest.fixture(scope="session", autouse=True)
def _flows_use_the_api(prefect_api) -> None:
    """Every flow test talks to the session's one Prefect API (tests/conftest.py)."""


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
