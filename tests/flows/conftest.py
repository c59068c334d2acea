"""One temporary Prefect API (SQLite) for every flow test of the session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Set before Prefect's settings are read: no telemetry ("database is locked" tracebacks).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> Iterator[None]:
    """Start the test harness once (~6 s); each flow run then costs about a second."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
