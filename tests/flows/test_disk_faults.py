"""Faults of the disk under the store. A run whose results cannot fit is refused before
any work; a disk that fills mid-run, or a location that cannot be written, ends the
`bayesdream run` command with one message naming the store and what the run needs, no
traceback, exit status 2 and nothing claimed complete; the rerun after space is freed
resumes where the run stopped (the fit kept, sampling at its second batch).

The terminal is that of a child process (`_cli_with_fault.py` makes its disk fail):
Prefect configures the logging of the process that runs a flow, which in-process
captures would not show as a user sees it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import zarr

from bayesdream_model.distributions import get_family
from flows.cli import main
from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.errors import InsufficientSpaceError
from tasks.filesystem import chunk_bytes, results_bytes, size
from tasks.lock import lock_path
from tasks.store import CIS_KEY, COMPLETE, GROUPS, data_arrays, fit_key, inputs_key, results_key

FLOWS = Path(__file__).parent
NSAMPLES = 4
# one draw a batch: the disk fills while the second batch is written
OPTIONS = ["fit.niters=50", f"fit.nsamples={NSAMPLES}", "fit.minibatch_size=1"]
Usage = namedtuple("Usage", "total used free")


def _demo(folder: Path) -> Path:
    return write_demo_inputs(folder, n_cells=60, n_features=8, niters=50, nsamples=NSAMPLES)


def _store(config: Path) -> Path:
    return (config.parent / "results" / "run.zarr").resolve()


def _cli(config: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """`bayesdream run CONFIG --set ...` in a child process (its disk failing as `fault`
    says), reporting to this session's Prefect API."""
    from prefect.settings import get_current_settings

    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    url = get_current_settings().api.url
    if url:
        env["PREFECT_API_URL"] = str(url)
    run = ["run", str(config), *(arg for o in OPTIONS for arg in ("--set", o))]
    if fault is None:
        command = [sys.executable, "-m", "flows.cli", *run]
    else:
        command = [sys.executable, str(FLOWS / "_cli_with_fault.py"), fault, str(_store(config))]
        command += run
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, cwd=FLOWS.parents[1]
    )


def _one_error(result: subprocess.CompletedProcess) -> str:
    """The one error line the command printed; nothing of a traceback."""
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return errors[0]


def _claims_complete(store: Path) -> list[str]:
    """The root and results groups that say `complete: true`."""
    if not (store / "zarr.json").exists():
        return []
    root = zarr.open_group(str(store), mode="r")
    keys = ["", results_key("gene"), CIS_KEY]
    return [key for key in keys if (root[key] if key else root).attrs.get(COMPLETE)]


@pytest.mark.slow  # end-to-end: the CLI in a child process, twice
def test_a_disk_full_mid_sampling_is_one_message_and_the_rerun_resumes(tmp_path: Path) -> None:
    config = _demo(tmp_path / "demo")
    store = _store(config)
    error = _one_error(_cli(config, "full-at-second-batch"))
    assert (
        f"No space left on device while writing the store '{store}' (at 'technical/gene/" in error
    )
    assert re.search(r"the results still to be written need about \d+\.\d kB", error), error
    assert "rerun the same command: finished steps are kept" in error
    assert _claims_complete(store) == []
    root = zarr.open_group(str(store), mode="r")
    assert root[fit_key("gene")].attrs[COMPLETE] is True
    assert root[results_key("gene")].attrs["batches_done"] == [0]
    assert not lock_path(store).exists()

    rerun = _cli(config)  # the space is freed
    assert rerun.returncode == 0, rerun.stderr
    assert "Modality 'gene': fit inputs unchanged, fit skipped" in rerun.stderr
    assert f"resuming sampling, 1 of {NSAMPLES} batches already written" in rerun.stderr
    assert _claims_complete(store) == ["", results_key("gene"), CIS_KEY]


@pytest.mark.slow  # end-to-end: the CLI in a child process
def test_a_read_only_store_location_is_one_message(tmp_path: Path) -> None:
    config = _demo(tmp_path / "demo")
    store = _store(config)
    error = _one_error(_cli(config, "read-only"))
    assert (
        f"Cannot write the store '{store}' (file '{lock_path(store)}'): Read-only file system."
        in error
    )
    assert "a folder on a writable disk" in error
    assert not store.exists() and not lock_path(store).exists()


@pytest.mark.slow  # end-to-end: the CLI in a child process
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without permission")
def test_a_store_folder_without_write_permission_is_one_message(tmp_path: Path) -> None:
    config = _demo(tmp_path / "demo")
    store = _store(config)
    store.parent.chmod(0o555)
    try:
        error = _one_error(_cli(config))
    finally:
        store.parent.chmod(0o755)
    assert f"Cannot write the store '{store}' (file '{lock_path(store)}'): Permission" in error
    assert not store.exists()


# -- the free space, checked in pre-flight ---------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo folder whose store holds a finished run (of OPTIONS)."""
    config = _demo(tmp_path_factory.mktemp("disk") / "demo")
    technical_fit(str(config), OPTIONS)
    return config.parent


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    """This test's copy of the finished folder; returns its config path."""
    return shutil.copytree(finished, tmp_path / "demo") / "config.yaml"


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_results_that_cannot_fit_are_refused_before_any_work(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(copy)
    root = zarr.open_group(str(store), mode="r")
    n_groups, shape = root[GROUPS]["labels"].shape[0], root[inputs_key("gene")]["counts"].shape
    nsamples = 250 * NSAMPLES  # more draws: the results are drawn again
    planned = results_bytes("negbinom", n_samples=nsamples, n_groups=n_groups, matrix_shape=shape)
    pending = planned - chunk_bytes(store / results_key("gene"))
    before = _tree(store.parent)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 10**12, 150_000))

    with pytest.raises(InsufficientSpaceError) as caught:
        technical_fit(str(copy), [*OPTIONS, f"fit.nsamples={nsamples}"])

    message = str(caught.value)
    assert message.startswith(
        f"Store '{store}': the results need {size(pending)} more on its disk ('gene': "
        f"{nsamples} draws x {n_groups} groups x {shape[0]} features"
    )
    assert "but only 150.0 kB is free there" in message
    assert _tree(store.parent) == before  # not a byte written, no lock left behind
    # the planned size is that of the arrays the first run preallocated (the results and
    # the cis feature's), per draw
    results = root[results_key("gene")]
    written = sum(results[out.name].nbytes for out in get_family("negbinom").outputs())
    written += sum(array.nbytes for array in data_arrays(root[CIS_KEY]).values())
    assert planned == written * (nsamples // NSAMPLES)


def test_a_rerun_that_keeps_its_results_needs_no_space(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 10**12, 0))
    technical_fit(str(copy), OPTIONS)
    assert _claims_complete(_store(copy)) == ["", results_key("gene"), CIS_KEY]


def test_a_full_disk_outside_a_run_is_one_message_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`summary --out` (or any command) on a full disk: the file named, no traceback."""
    import tasks.results.summary

    out = tmp_path / "effects.csv"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(tasks.results.summary, "summarize", full)
    with caplog.at_level(logging.ERROR, logger="bayesdream"):
        status = main(
            ["summary", str(tmp_path / "run.zarr"), "--modality", "gene", "--out", str(out)]
        )
    assert status == 2
    assert f"No space left on device: '{out}'. Free space there and rerun." in caplog.text
