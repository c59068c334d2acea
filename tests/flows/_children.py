"""Real child processes running the flow (to kill them, or to race them on one store).

The child runs `tests/flows/_run_flow.py` against the session's Prefect API, with this
process's code version, so that parent and child agree on every step's fingerprint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import tasks.fingerprint

RUN_FLOW = Path(__file__).with_name("_run_flow.py")
CHILD_TIMEOUT = 240.0


def child_env(folder: Path) -> dict[str, str]:
    """The session's Prefect API (no server start per child), a private PREFECT_HOME, and
    this process's code version, so that parent and child agree on every fingerprint."""
    from prefect.settings import get_current_settings

    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(folder / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        BAYESDREAM_CODE_VERSION=tasks.fingerprint.code_version(),
    )
    url = get_current_settings().api.url
    if url:
        env["PREFECT_API_URL"] = str(url)
    return env


class Child:
    """The flow in a child process (its own process group), killed with SIGKILL."""

    def __init__(self, config: Path, overrides: list[str], folder: Path, index: int = 0) -> None:
        self.log = folder / f"child{index}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(RUN_FLOW), str(config), *overrides],
                cwd=folder,
                env=child_env(folder),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll every 10 ms until `condition()`; fail if the child ends first."""
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(
                    f"the child ended (rc {self.process.returncode}) before {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {CHILD_TIMEOUT:.0f} s:\n{self.tail()}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the whole process group (no cleanup runs) and reap the child."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        assert self.process.returncode == -signal.SIGKILL, self.tail()

    def finish(self) -> int:
        """Wait for the child to end by itself; its exit status."""
        return self.process.wait(timeout=CHILD_TIMEOUT)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]
