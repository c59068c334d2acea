"""One writer per store, with two real processes: the second run refuses at once, naming
the first, and the first runs on to a complete store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from _children import child_env

from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.lock import StoreLockedError, lock_path, read_holder
from tasks.store import COMPLETE, fit_key, results_key

#: the end-to-end tier: two runs in child processes (tests/tasks/test_lock.py takes the lock in-process)
pytestmark = pytest.mark.slow

# A fit that does not stop early (|a*(loss-ewma)| < 0 never holds): long enough to be
# caught in the middle, and paused there (SIGSTOP) while the second run tries.
FIRST = ["fit.niters=3000", "fit.convergence=ewma", "fit.tolerance=0", "fit.nsamples=10"]
PROJECT = Path(__file__).resolve().parents[2]


def test_a_second_run_on_a_store_in_use_refuses_and_the_first_is_unaffected(
    tmp_path: Path, child
) -> None:
    config = write_demo_inputs(tmp_path / "demo", n_cells=120, n_features=10, nsamples=10)
    store = config.parent / "results" / "run.zarr"
    first = child(config, FIRST)
    first.wait_until(lambda: (store / fit_key("gene") / "zarr.json").exists(), "the first fit")
    os.killpg(first.process.pid, signal.SIGSTOP)  # mid-fit, holding the lock
    try:
        holder = read_holder(store)
        assert holder is not None and holder.pid == first.process.pid
        # a manual run from the command line: refused before Prefect even starts
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(config)],
            capture_output=True,
            text=True,
            env=child_env(tmp_path),
            cwd=PROJECT,
            timeout=120,
        )
        took = time.monotonic() - started
        assert second.returncode == 2, second.stderr
        assert f"is in use by another run: pid {first.process.pid} on host" in second.stderr
        assert "Starting temporary server" not in second.stderr and took < 60
        # a run that reaches the flow (a deployment's, say): the flow refuses it too
        with pytest.raises(StoreLockedError, match=f"pid {first.process.pid} on host"):
            technical_fit(str(config), ["fit.niters=10"])
        assert read_holder(store) == holder
    finally:
        os.killpg(first.process.pid, signal.SIGCONT)
    assert first.finish() == 0, first.tail()
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs[COMPLETE] is True
    assert root[results_key("gene")].attrs["niters_run"] == 3000  # the first run's own fit
    assert not lock_path(store).exists()
    technical_fit(str(config), FIRST)  # free again: a later run (unchanged) goes through
