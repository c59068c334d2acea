"""Suite-wide: tests marked `gpu` are skipped where torch sees no CUDA device; one temporary
Prefect API (SQLite) for every test of the session that needs one."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Set before Prefect's settings are read: no telemetry ("database is locked" tracebacks).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """Start the test harness once per test run (~6-13 s); each flow run then costs about
    a second. Every flow test uses it (tests/flows/conftest.py), and so do the task tests
    that read Prefect artifacts: one harness, not one per module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need a CUDA device; everywhere else they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
