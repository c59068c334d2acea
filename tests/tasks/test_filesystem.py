"""The disk under the store: the results' planned size, the free-space refusal, and the
one-message account of disk-full / quota / read-only / permission faults."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from stores import npy_store

from bayesdream_model.distributions import get_family
from tasks.errors import InsufficientSpaceError, StoreWriteError
from tasks.filesystem import (
    check_free_space,
    file_system_fault,
    results_bytes,
    size,
    store_faults,
)
from tasks.groups import read_groups
from tasks.sample.sampling import SampleRequest, sample_modality
from tasks.store import inputs_key, results_key

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def free(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The free bytes every disk reports (set the list's one item)."""
    report = [10**12]
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(2 * 10**12, 10**12, report[0]))
    return report


@pytest.mark.parametrize("distribution", ["negbinom", "multinomial", "binomial"])
def test_planned_size_is_that_of_the_preallocated_results(
    tmp_path: Path, distribution: str
) -> None:
    root, dims = npy_store(tmp_path, distribution, n_groups=2)
    sample_modality(root, "m", SampleRequest(nsamples=dims["S"]))
    group = root[results_key("m")]
    written = sum(group[out.name].nbytes for out in get_family(distribution).outputs())
    planned = results_bytes(
        distribution,
        n_samples=dims["S"],
        n_groups=len(read_groups(root).labels),
        matrix_shape=root[inputs_key("m")]["counts"].shape,
    )
    assert planned == written


def test_results_that_do_not_fit_are_refused_with_both_sizes(
    tmp_path: Path, free: list[int]
) -> None:
    free[0] = 2_500_000
    with pytest.raises(InsufficientSpaceError) as caught:
        check_free_space(tmp_path / "run.zarr", 3_200_000_000, "'gene': 1000 draws")
    message = str(caught.value)
    assert "the results need 3.20 GB more on its disk" in message
    assert "only 2.5 MB is free there" in message
    assert "Free at least 3.20 GB there" in message and "nothing was written" in message
    free[0] = 3_200_000_000
    check_free_space(tmp_path / "run.zarr", 3_200_000_000, "'gene': 1000 draws")  # fits


def _write_chunk(path: Path) -> None:
    """A write(2) that fails as a full disk does: the error names no file (zarr's local
    store writes a chunk through a function of `path`)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_store_the_key_and_the_rerun(tmp_path: Path, free: list[int]) -> None:
    store, free[0] = tmp_path / "run.zarr", 0
    with pytest.raises(StoreWriteError) as caught, store_faults(store):
        _write_chunk(store / "technical" / "gene" / "alpha_y" / "c" / "1" / "0" / "0")
    message = str(caught.value)
    assert message.startswith(
        f"No space left on device while writing the store '{store}' "
        "(at 'technical/gene/alpha_y'): 0.0 kB free there."
    )
    assert "rerun the same command: finished steps are kept" in message
    assert isinstance(caught.value.__cause__, OSError)  # --debug shows the original


def test_a_used_up_quota_says_to_free_space_within_it(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    err = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(store / "fit" / "zarr.json"))
    message = str(file_system_fault(err, store))
    assert message.startswith(
        f"{os.strerror(errno.EDQUOT)} while writing the store '{store}' (at 'fit')."
    )
    assert "within your quota there, or ask for a larger quota, and rerun" in message


@pytest.mark.parametrize(
    ("code", "reason", "fix"),
    [
        (errno.EROFS, "Read-only file system", "Give `store:` a folder on a writable disk"),
        (errno.EACCES, "Permission denied", "writable for user"),
    ],
)
def test_a_lock_file_that_cannot_be_written_names_the_store_and_the_fix(
    tmp_path: Path, code: int, reason: str, fix: str
) -> None:
    store = tmp_path / "run.zarr"
    lock = tmp_path / "run.zarr.lock"
    message = str(file_system_fault(OSError(code, os.strerror(code), str(lock)), store))
    assert message.startswith(f"Cannot write the store '{store}' (file '{lock}'): {reason}.")
    assert fix in message


def test_a_fault_outside_the_store_names_its_file_not_the_store(tmp_path: Path) -> None:
    cells = tmp_path / "cells.csv"
    err = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(cells))
    message = str(file_system_fault(err, tmp_path / "run.zarr"))
    assert message.startswith(f"Permission denied: '{cells}'. Give user ")
    assert "the store" not in message


def test_other_errors_pass_unchanged(tmp_path: Path) -> None:
    assert file_system_fault(FileNotFoundError(errno.ENOENT, "gone")) is None
    with pytest.raises(FileNotFoundError), store_faults(tmp_path / "run.zarr"):
        raise FileNotFoundError(errno.ENOENT, "gone")


@pytest.mark.parametrize(
    ("n_bytes", "text"), [(12_345, "12.3 kB"), (45_600_000, "45.6 MB"), (1.234e9, "1.23 GB")]
)
def test_sizes_read_in_their_unit(n_bytes: float, text: str) -> None:
    assert size(n_bytes) == text
