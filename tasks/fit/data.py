"""The fit's data, decided in one place (`fit_data`): in memory dense, in memory sparse
(negbinom's non-zeros, when they fit: the read that stops at its limit, and the estimate
that skips a read that would not fit), or streamed from the store in cell batches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import zarr

from bayesdream_model.data import FitArrays
from bayesdream_model.memory import FitPlan, MemoryBudget, max_sparse_nonzero, plan_fit
from bayesdream_model.sparse import SparseCounts
from bayesdream_model.streaming import read_ahead
from tasks.config import FitConfig
from tasks.fit.cell_source import StoreCells
from tasks.selection import FitSelection, read_selection
from tasks.store import FEATURE_CHUNK, inputs_key

#: feature blocks read to estimate the fit matrix's non-zeros before reading it sparse, and
#: how far past the limit the estimate must be to skip the read (which stops at the limit
#: anyway: on the 200,000-cell screen it read ~60 % of the store, ~40 s, before streaming)
SAMPLED_BLOCKS = 6
ESTIMATE_MARGIN = 1.25


def fit_data(
    root: zarr.Group, selection: FitSelection, fit: FitConfig, budget: MemoryBudget
) -> tuple[FitPlan, FitArrays | StoreCells, str]:
    """The plan, the data the fit reads, and how (for the log): the selection held in
    memory (sparse where the family reads non-zeros only and they fit, else dense), or,
    when it does not fit `budget` (or `fit.stream_cells` asks), read in cell batches."""
    matrix = root[inputs_key(selection.name)]["counts"]
    plan = plan_fit(
        n_cells=len(selection.cells),
        entries_per_cell=selection.entries_per_cell(matrix),
        budget=budget,
        mode=fit.stream_cells,
        batch_cells=fit.cell_batch,
    )
    plan, data = held_sparse(root, selection, plan=plan, budget=budget, mode=fit.stream_cells)
    if plan.stream:
        cells = StoreCells(root, selection, batch_cells=plan.batch_cells)
        how = f"read in {cells.n_batches} batches of <= {plan.batch_cells} cells, " + (
            "their statistics merged" if selection.family.mergeable else "one batch per step"
        )
        return plan, cells, how
    if data is None:
        data = read_selection(root, selection)
    return plan, data, "in memory, sparse" if plan.sparse else "in memory"


def held_sparse(
    root: zarr.Group,
    selection: FitSelection,
    *,
    plan: FitPlan,
    budget: MemoryBudget,
    mode: str = "auto",
) -> tuple[FitPlan, FitArrays | None]:
    """For a family that may hold its fit matrix sparse (negbinom): its non-zeros, read
    within `budget`, and the plan that counts their bytes (`plan_fit(nonzero=...)`).
    Otherwise `plan` (the dense plan of the same fit) and None: for the other families,
    when streaming is asked for (`mode` always), or when even the sparse form does not
    fit (`mode` auto; `never` reads it whatever its size)."""
    if not selection.family.sparse_fit or mode == "always":
        return plan, None
    n_cells, n_features = len(selection.cells), len(selection.features)
    limit = None if mode == "never" else max_sparse_nonzero(budget, n_cells, n_features)
    if limit is not None and n_cells * n_features <= limit:
        limit = None  # even every entry non-zero fits: nothing to estimate or stop at
    estimate = None if limit is None else estimated_nonzero(root, selection)
    if estimate is not None and estimate > ESTIMATE_MARGIN * limit:
        reason = f"~{estimate:,} non-zeros (from {SAMPLED_BLOCKS} feature blocks) > {limit:,}"
        return replace(plan, reason=f"{plan.reason}; {reason}: not sparse either"), None
    data = read_sparse_fit_arrays(root, selection, max_nonzero=limit)
    if data is None:
        return replace(
            plan, reason=f"{plan.reason}; > {limit:,} non-zeros: not sparse either"
        ), None
    sparse = plan_fit(
        n_cells=n_cells,
        entries_per_cell=n_features,
        budget=budget,
        mode=mode,
        nonzero=data.y.nnz,
    )
    return sparse, data


class _TooManyNonzeros(Exception):
    """Raised inside the sparse read when the non-zeros pass their limit."""


def read_sparse_fit_arrays(
    root: zarr.Group, selection: FitSelection, *, max_nonzero: int | None = None
) -> FitArrays | None:
    """The selection's counts kept as their non-zeros (`SparseCounts`), for a family that
    reads only those (negbinom): the store is read one block of FEATURE_CHUNK features x
    every fit cell at a time, as the filters read it, and each block is reduced to its
    non-zeros before the next is read, so the dense matrix is never whole in memory.
    None as soon as more than `max_nonzero` non-zeros were found: the caller streams."""
    counts = root[inputs_key(selection.name)]["counts"]
    cells, features = selection.cells, selection.features
    limit = np.inf if max_nonzero is None else max_nonzero

    def blocks():
        found = 0
        for start in range(0, len(features), FEATURE_CHUNK):
            block = _feature_major(counts, cells, features[start : start + FEATURE_CHUNK])
            found += np.count_nonzero(block)
            if found > limit:
                raise _TooManyNonzeros
            yield block

    try:
        y = SparseCounts.from_blocks(read_ahead(blocks()), n_rows=len(cells))
    except _TooManyNonzeros:
        return None
    return FitArrays(
        y=y, groups=selection.codes, n_groups=selection.n_groups, sum_factor=selection.sum_factor
    )


def _feature_major(counts: zarr.Array, cells: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """[cells, features] float32 as a view of the store's [features, cells] read: column-
    major, the order `SparseCounts.from_blocks` scans fastest (no transposing copy, no sort)."""
    values = counts.get_orthogonal_selection((chunk, cells))
    return np.swapaxes(values.astype(np.float32, copy=False), 0, 1)


def estimated_nonzero(root: zarr.Group, selection: FitSelection) -> int | None:
    """The selection's non-zeros, scaled up from SAMPLED_BLOCKS blocks of FEATURE_CHUNK
    features spread evenly over its features; None when there are no more blocks than
    that (reading them all is the sparse read itself)."""
    features = selection.features
    n_blocks = -(-len(features) // FEATURE_CHUNK)
    if n_blocks <= SAMPLED_BLOCKS:
        return None
    counts = root[inputs_key(selection.name)]["counts"]
    found = seen = 0
    for block in np.linspace(0, n_blocks - 1, SAMPLED_BLOCKS).round().astype(int):
        chunk = features[block * FEATURE_CHUNK : (block + 1) * FEATURE_CHUNK]
        found += int(np.count_nonzero(_feature_major(counts, selection.cells, chunk)))
        seen += len(chunk)
    return round(found * len(features) / seen)
