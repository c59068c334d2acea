"""A negbinom fit holds its fit matrix as its non-zeros, read from the store block by block.

The store is read one block of features x every fit cell at a time, each block reduced to
its non-zeros; the plan counts the sparse form's bytes, so a screen whose dense matrix
does not fit the budget is still fit in memory when its non-zeros do, and streamed only
when they do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import stores
from stores import npy_store

import tasks.fit.data
import tasks.fit.fitting
import tasks.selection
from bayesdream_model.memory import MemoryBudget, plan_fit, sparse_bytes
from bayesdream_model.sparse import SparseCounts
from tasks.config import load_config
from tasks.filter.flags import read_flags
from tasks.fit.data import read_sparse_fit_arrays
from tasks.fit.fitting import fit_modality
from tasks.groups import read_groups
from tasks.selection import read_fit_arrays, select_fit
from tasks.store import fit_key

GB = 10**9


def _budget(bytes_: float) -> MemoryBudget:
    return MemoryBudget(int(bytes_), "test", 1.0)


def test_plan_counts_the_sparse_form() -> None:
    """80,000 NTC x 30,000 genes at 10 %: 2.4e8 non-zeros, ~3.5 GB sparse vs ~29 GB dense."""
    big = {"n_cells": 80_000, "entries_per_cell": 30_000}
    nonzero = 80_000 * 30_000 // 10
    assert plan_fit(**big, budget=_budget(8 * GB)).stream  # dense: streamed
    sparse = plan_fit(**big, budget=_budget(8 * GB), nonzero=nonzero)
    assert not sparse.stream and sparse.sparse and "non-zeros" in sparse.reason
    assert sparse_bytes(nonzero, 80_000, 30_000) < 4 * GB
    assert plan_fit(**big, budget=_budget(3 * GB), nonzero=nonzero).stream  # not even sparse


@pytest.fixture
def sparse_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """npy_store's negbinom counts ~10 % non-zero (every feature but the last has some).
    (So small a matrix fits dense in fewer bytes than sparse: the dense block the priors
    are computed on is the whole of it; from 512 features on, the block is capped.)"""

    def values(distribution, rng, shape):
        y = (rng.random(shape) < 0.1) * (1.0 + rng.poisson(3.0, shape))
        y[:-1, 0] = 2.0
        y[-1] = 0.0
        return {"counts": y.astype(np.float32)}

    monkeypatch.setattr(stores, "matrix_values", values)


@pytest.mark.parametrize("block", [2, 512])
def test_sparse_read_equals_the_dense_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_counts: None, block: int
) -> None:
    monkeypatch.setattr(tasks.selection, "FEATURE_CHUNK", block)
    monkeypatch.setattr(tasks.fit.data, "FEATURE_CHUNK", block)
    root, _ = npy_store(tmp_path, "negbinom", 3)
    groups = read_groups(root)
    features = np.flatnonzero(read_flags(root, "m").technical_correction_applied)
    dense = read_fit_arrays(root, "m", groups, features=features)
    sparse = read_sparse_fit_arrays(root, select_fit(root, "m", groups, features))
    assert isinstance(sparse.y, SparseCounts) and sparse.y.nnz == np.count_nonzero(dense.y)
    np.testing.assert_array_equal(sparse.y.dense(), dense.y)
    np.testing.assert_array_equal(sparse.groups, dense.groups)
    np.testing.assert_array_equal(sparse.sum_factor, dense.sum_factor)
    too_few = read_sparse_fit_arrays(
        root, select_fit(root, "m", groups, features), max_nonzero=sparse.y.nnz - 1
    )
    assert too_few is None


def test_fit_step_holds_negbinom_sparse_and_streams_only_what_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_counts: None
) -> None:
    root, dims = npy_store(tmp_path, "negbinom", 3)  # fit once, auto: held sparse
    group = root[fit_key("m")]
    assert group.attrs["fit_matrix_sparse"] is True and group.attrs["cells_streamed"] is False
    loss = group["loss"][...]
    cfg = load_config(tmp_path / "config.yaml")
    groups = read_groups(root)
    features = np.flatnonzero(read_flags(root, "m").technical_correction_applied)
    nonzero = read_sparse_fit_arrays(root, select_fit(root, "m", groups, features)).y.nnz
    n_cells, n_features = 60, len(features)
    held = sparse_bytes(nonzero, n_cells, n_features)
    dense = n_cells * n_features * 12
    # (budget, streamed, sparse): the non-zeros fit; they do not, the dense matrix may;
    # neither fits
    cases = [(held, False, True), (held - 1, dense > held - 1, False)]
    cases.append((min(held, dense) - 1, True, False))
    for budget, streamed, sparse in cases:
        monkeypatch.setattr(
            tasks.fit.fitting, "sampling_budget", lambda device, b=budget: _budget(b)
        )
        assert fit_modality(root, "m", cfg.fit)["cells_streamed"] is streamed
        assert root[fit_key("m")].attrs["fit_matrix_sparse"] is sparse
    monkeypatch.setattr(tasks.fit.fitting, "sampling_budget", lambda device: _budget(held))
    fit_modality(root, "m", cfg.fit)
    np.testing.assert_array_equal(root[fit_key("m")]["loss"][...], loss)  # the same fit
    forced = load_config(tmp_path / "config.yaml", ["fit.stream_cells=always", "fit.cell_batch=20"])
    assert fit_modality(root, "m", forced.fit)["cells_streamed"]
    assert root[fit_key("m")].attrs["fit_matrix_sparse"] is False


def test_a_sparse_form_estimated_far_over_the_budget_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_counts: None
) -> None:
    """A few evenly spread feature blocks estimate the non-zeros: far over the limit, the
    fit streams without reading the store sparse first; within it, the read decides."""
    monkeypatch.setattr(tasks.fit.data, "FEATURE_CHUNK", 1)
    monkeypatch.setattr(tasks.fit.data, "SAMPLED_BLOCKS", 2)
    root, _ = npy_store(tmp_path, "negbinom", 3)
    groups = read_groups(root)
    features = np.flatnonzero(read_flags(root, "m").technical_correction_applied)
    nonzero = read_sparse_fit_arrays(root, select_fit(root, "m", groups, features)).y.nnz
    selection = select_fit(root, "m", groups, features)
    estimate = tasks.fit.data.estimated_nonzero(root, selection)
    assert len(features) == 4 and 0.5 * nonzero <= estimate <= 2 * nonzero
    plan = plan_fit(n_cells=60, entries_per_cell=4, budget=_budget(1))

    def refuse(*args, **kwargs):
        raise AssertionError("the store was read sparse")

    with monkeypatch.context() as patched:
        patched.setattr(tasks.fit.data, "read_sparse_fit_arrays", refuse)
        tight = _budget(sparse_bytes(estimate // 2, 60, 4))
        streamed, data = tasks.fit.data.held_sparse(root, selection, plan=plan, budget=tight)
    assert data is None and f"~{estimate:,} non-zeros (from 2 feature blocks)" in streamed.reason
    roomy = _budget(sparse_bytes(max(estimate, nonzero), 60, 4))
    held, data = tasks.fit.data.held_sparse(root, selection, plan=plan, budget=roomy)
    assert data is not None and data.y.nnz == nonzero and held.sparse
