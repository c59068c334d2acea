"""Fit cells streamed from a real store: chunk-aligned batches, the plan, the fit step.

The store is written with 16-cell chunks (the default is 8,192) so that a small demo screen
spans many chunks. Streamed fits of the families whose likelihood reads per-group sums
(binomial, multinomial, normal) merge exact statistics, so they must equal the in-memory
fit step for step; negbinom and Student-t see one batch per step (their recovery and
unbiasedness are tested in tests/model/test_streaming.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from stores import filtered_store, npy_store

import tasks.fit.fitting
import tasks.ingest.matrix
from bayesdream_model.memory import STREAM_BUFFERS, MemoryBudget, plan_fit
from tasks.config import load_config
from tasks.demo import write_demo_inputs
from tasks.filter.flags import read_flags
from tasks.fit.cell_source import StoreCells, chunk_batches
from tasks.fit.fitting import fit_modality
from tasks.groups import read_groups
from tasks.sample.sampling import SampleRequest, sample_modality
from tasks.selection import fit_cell_index, read_fit_arrays, select_fit
from tasks.store import COMPLETE, fit_key, results_key

CHUNK = 16
GB = 10**9


# -- batches that follow the store's chunks -----------------------------------------------
def _check_partition(cells: np.ndarray, bounds: np.ndarray, batch: int, chunk: int) -> None:
    assert bounds[0] == 0 and bounds[-1] == len(cells) and (np.diff(bounds) > 0).all()
    assert np.diff(bounds).max() <= batch
    per_chunk = np.bincount(cells // chunk)
    for cut in bounds[1:-1]:  # a cut inside a chunk only where that chunk alone is too big
        if cells[cut - 1] // chunk == cells[cut] // chunk:
            assert per_chunk[cells[cut] // chunk] > batch


@pytest.mark.parametrize("batch", [1, 5, 12, 16, 40, 1000])
def test_chunk_batches_never_split_a_chunk_that_fits(batch: int) -> None:
    rng = np.random.default_rng(batch)
    cells = np.flatnonzero(rng.random(400) < 0.6)  # fit cells: 60 % of the table
    _check_partition(cells, chunk_batches(cells, batch, CHUNK), batch, CHUNK)


def test_chunk_batches_pack_whole_chunks() -> None:
    cells = np.arange(64)  # 4 full chunks of 16
    assert chunk_batches(cells, 40, CHUNK).tolist() == [0, 32, 64]
    assert chunk_batches(cells, 10, CHUNK).tolist() == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    assert chunk_batches(cells, 64, CHUNK).tolist() == [0, 64]


# -- the plan ---------------------------------------------------------------------------
def _budget(bytes_: float) -> MemoryBudget:
    return MemoryBudget(int(bytes_), "test", 1.0)


def test_plan_streams_only_what_does_not_fit() -> None:
    # 80,000 cells x 30,000 genes: 9.6 GB as float32, ~29 GB while fitting
    big = {"n_cells": 80_000, "entries_per_cell": 30_000}
    plan = plan_fit(**big, budget=_budget(8 * GB))
    assert plan.stream and 0 < plan.batch_cells < 80_000
    assert plan.batch_cells * 30_000 * 12 * STREAM_BUFFERS <= 8 * GB  # all buffers in budget
    assert "do not fit" in plan.reason
    assert not plan_fit(**big, budget=_budget(64 * GB)).stream
    assert not plan_fit(**big, budget=_budget(1 * GB), mode="never").stream
    forced = plan_fit(**big, budget=_budget(64 * GB), mode="always", batch_cells=5000)
    assert forced.stream and forced.batch_cells == 5000


# -- a real store -----------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.ingest.matrix, "CELL_CHUNK", CHUNK)


@pytest.mark.parametrize("distribution", ["negbinom", "binomial", "multinomial"])
def test_store_cells_hand_out_the_fit_matrix(
    tmp_path: Path, small_chunks: None, distribution: str
) -> None:
    root, _ = npy_store(tmp_path, distribution, 3)
    assert root["inputs/m/counts"].chunks[1] == CHUNK
    groups = read_groups(root)
    features = np.flatnonzero(read_flags(root, "m").technical_correction_applied)
    whole = read_fit_arrays(root, "m", groups, features=features)
    cells = StoreCells(root, select_fit(root, "m", groups, features), batch_cells=20)
    assert cells.n_batches > 2 and cells.n_cells == whole.n_cells
    batches = [cells.read_batch(k) for k in range(cells.n_batches)]
    np.testing.assert_array_equal(np.concatenate([b.y for b in batches]), whole.y)
    np.testing.assert_array_equal(np.concatenate([b.groups for b in batches]), whole.groups)
    for key in ("sum_factor", "denominator"):
        if getattr(whole, key) is not None:
            joined = np.concatenate([getattr(b, key) for b in batches])
            np.testing.assert_array_equal(joined, getattr(whole, key))
    blocks = list(cells.feature_blocks())
    np.testing.assert_array_equal(np.concatenate([b.y for b in blocks], axis=1), whole.y)
    _check_partition(fit_cell_index(root, "m", groups), cells.bounds, 20, CHUNK)


def _refit(root: zarr.Group, folder: Path, overrides: list[str]) -> dict:
    cfg = load_config(folder / "config.yaml", ["fit.niters=40", *overrides])
    return fit_modality(root, "m", cfg.fit)


@pytest.mark.parametrize("distribution", ["binomial", "multinomial", "normal"])
def test_streamed_merged_fit_equals_the_in_memory_fit(
    tmp_path: Path, small_chunks: None, distribution: str
) -> None:
    root, _ = npy_store(tmp_path, distribution, 3)
    assert not _refit(root, tmp_path, [])["cells_streamed"]
    memory = root[fit_key("m")]
    in_memory = {k: a[...] for k, a in memory["params"].arrays()}
    loss = memory["loss"][...]
    summary = _refit(root, tmp_path, ["fit.stream_cells=always", "fit.cell_batch=20"])
    group = root[fit_key("m")]
    assert summary["cells_streamed"] and group.attrs["cells_streamed"] is True
    assert group.attrs["cell_batches"] > 2 and group.attrs[COMPLETE] is True
    np.testing.assert_allclose(group["loss"][...], loss, rtol=1e-5)
    for key, value in in_memory.items():
        np.testing.assert_allclose(group["params"][key][...], value, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("distribution", ["negbinom", "studentt"])
def test_streamed_fit_step_writes_a_fit_that_samples(
    tmp_path: Path, small_chunks: None, distribution: str
) -> None:
    root, dims = npy_store(tmp_path, distribution, 3)
    summary = _refit(root, tmp_path, ["fit.stream_cells=always", "fit.cell_batch=20"])
    group = root[fit_key("m")]
    assert summary["cells_streamed"] and group.attrs["cell_batches"] == 4  # 60 cells: chunks of 16
    assert np.isfinite(group["loss"][...]).all()
    sample_modality(root, "m", SampleRequest(nsamples=dims["S"], seed=1))
    assert root[results_key("m")].attrs[COMPLETE] is True


def test_auto_streams_when_the_budget_is_too_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_demo_inputs(tmp_path, n_cells=120, n_features=12, niters=30, nsamples=10)
    cfg = load_config(config)
    root = filtered_store(cfg, "gene")
    assert not fit_modality(root, "gene", cfg.fit)["cells_streamed"]
    n_cells = len(fit_cell_index(root, "gene", read_groups(root)))
    n_features = int(read_flags(root, "gene").technical_correction_applied.sum())
    budget = STREAM_BUFFERS * 10 * n_features * 12  # batches of 10 cells, 12 B an entry
    monkeypatch.setattr(tasks.fit.fitting, "sampling_budget", lambda device: _budget(budget))
    assert fit_modality(root, "gene", cfg.fit)["cells_streamed"]
    assert root[fit_key("gene")].attrs["cell_batches"] == -(-n_cells // 10)  # one chunk
