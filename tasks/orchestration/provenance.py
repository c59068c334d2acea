"""Who and what produced a store: package versions, git commit, host, times."""

from __future__ import annotations

import datetime as dt
import getpass
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "bayesdream-pipeline",
    "torch",
    "pyro-ppl",
    "prefect",
    "zarr",
    "numpy",
    "pandas",
    "scipy",
    "dask",
)


def iso(timestamp: float) -> str:
    """UTC ISO-8601 time."""
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).isoformat()


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit() -> str | None:
    """The commit of the code that ran, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe() -> dict:
    """Everything above plus the host and the user."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {
        "versions": versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "user": user,
    }
