"""The fit cells' data read back from the store, and the NTC feature filters."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import zarr

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import FilterFlags, get_family
from bayesdream_model.errors import NoFeaturesLeftError
from bayesdream_model.memory import FitPlan, MemoryBudget, max_sparse_nonzero, plan_fit
from bayesdream_model.sparse import SparseCounts
from bayesdream_model.streaming import read_ahead
from tasks.distributed import dask_flags, on_dask_worker, store_path
from tasks.errors import InputDataError
from tasks.groups import GroupAssignment
from tasks.store import (
    CELLS,
    FEATURE,
    FEATURE_CHUNK,
    fresh_group,
    inputs_key,
    mark_complete,
    prep_key,
    read_strings,
    write_array,
    write_coordinates,
)

logger = logging.getLogger(__name__)


def fit_cell_index(root: zarr.Group, name: str, groups: GroupAssignment) -> np.ndarray:
    """Columns (cells of the table) that are fit for this modality; every group needs some."""
    present = root[inputs_key(name)]["present"][...]
    index = np.flatnonzero(groups.fit & present)
    per_group = np.bincount(groups.code[index], minlength=len(groups.labels))
    missing = [groups.labels[g] for g in np.flatnonzero(per_group == 0)]
    if missing:
        raise InputDataError(
            f"Modality '{name}': technical groups {missing} have no fit cells in its matrix "
            f"(store key '{inputs_key(name)}/present'); add their NTC cells to the matrix."
        )
    return index


def read_columns(array: zarr.Array, cells: np.ndarray, features: np.ndarray) -> np.ndarray:
    """[N_fit, T_sel(, K)] float32 from a [T, N(, K)] array, one feature block at a time."""
    out = np.empty((len(cells), len(features), *array.shape[2:]), dtype=np.float32)
    for start in range(0, len(features), FEATURE_CHUNK):
        block = features[start : start + FEATURE_CHUNK]
        values = array.get_orthogonal_selection((block, cells))  # [t, n(, K)]
        out[:, start : start + len(block)] = np.swapaxes(values, 0, 1)
    return out


def read_fit_arrays(
    root: zarr.Group,
    name: str,
    groups: GroupAssignment,
    *,
    features: np.ndarray | None = None,
) -> FitArrays:
    """The fit cells' counts (and size factors / denominator when the family needs them)."""
    group = root[inputs_key(name)]
    family = get_family(group.attrs["distribution"])
    cells = fit_cell_index(root, name, groups)
    counts = group["counts"]
    features = np.arange(counts.shape[0]) if features is None else np.asarray(features)
    sum_factor = None
    if family.spec.needs_sum_factor:
        sum_factor = root[CELLS]["sum_factor"][...][cells].astype(np.float32)
    denominator = None
    if family.spec.needs_denominator:
        denominator = read_columns(group["denominator"], cells, features)
    return FitArrays(
        y=read_columns(counts, cells, features),
        groups=groups.code[cells],
        n_groups=len(groups.labels),
        sum_factor=sum_factor,
        denominator=denominator,
    )


class _TooManyNonzeros(Exception):
    """Raised inside the sparse read when the non-zeros pass their limit."""


def read_sparse_fit_arrays(
    root: zarr.Group,
    name: str,
    groups: GroupAssignment,
    *,
    features: np.ndarray | None = None,
    max_nonzero: int | None = None,
) -> FitArrays | None:
    """The fit cells' counts kept as their non-zeros (`SparseCounts`), for a family that
    reads only those (negbinom): the store is read one block of FEATURE_CHUNK features x
    every fit cell at a time, as the filters read it, and each block is reduced to its
    non-zeros before the next is read, so the dense matrix is never whole in memory.
    None as soon as more than `max_nonzero` non-zeros were found: the caller streams."""
    group = root[inputs_key(name)]
    cells = fit_cell_index(root, name, groups)
    counts = group["counts"]
    features = np.arange(counts.shape[0]) if features is None else np.asarray(features)
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
        y=y,
        groups=groups.code[cells],
        n_groups=len(groups.labels),
        sum_factor=root[CELLS]["sum_factor"][...][cells].astype(np.float32),
    )


#: feature blocks read to estimate the fit matrix's non-zeros before reading it sparse, and
#: how far past the limit the estimate must be to skip the read (which stops at the limit
#: anyway: on the 200,000-cell screen it read ~60 % of the store, ~40 s, before streaming)
SAMPLED_BLOCKS = 6
ESTIMATE_MARGIN = 1.25


def _feature_major(counts: zarr.Array, cells: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """[cells, features] float32 as a view of the store's [features, cells] read: column-
    major, the order `SparseCounts.from_blocks` scans fastest (no transposing copy, no sort)."""
    values = counts.get_orthogonal_selection((chunk, cells))
    return np.swapaxes(values.astype(np.float32, copy=False), 0, 1)


def estimated_nonzero(
    root: zarr.Group, name: str, cells: np.ndarray, features: np.ndarray
) -> int | None:
    """The non-zeros of the fit cells `cells` over `features`, scaled up from
    SAMPLED_BLOCKS blocks of FEATURE_CHUNK features spread evenly over them; None when
    there are no more blocks than that (reading them all is the sparse read itself)."""
    n_blocks = -(-len(features) // FEATURE_CHUNK)
    if n_blocks <= SAMPLED_BLOCKS:
        return None
    counts = root[inputs_key(name)]["counts"]
    found = seen = 0
    for block in np.linspace(0, n_blocks - 1, SAMPLED_BLOCKS).round().astype(int):
        chunk = features[block * FEATURE_CHUNK : (block + 1) * FEATURE_CHUNK]
        found += int(np.count_nonzero(_feature_major(counts, cells, chunk)))
        seen += len(chunk)
    return round(found * len(features) / seen)


def held_sparse(
    root: zarr.Group,
    name: str,
    groups: GroupAssignment,
    features: np.ndarray,
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
    family = get_family(root[inputs_key(name)].attrs["distribution"])
    if not family.sparse_fit or mode == "always":
        return plan, None
    cells = fit_cell_index(root, name, groups)
    n_cells = len(cells)
    limit = None if mode == "never" else max_sparse_nonzero(budget, n_cells, len(features))
    if limit is not None and n_cells * len(features) <= limit:
        limit = None  # even every entry non-zero fits: nothing to estimate or stop at
    estimate = None if limit is None else estimated_nonzero(root, name, cells, features)
    if estimate is not None and estimate > ESTIMATE_MARGIN * limit:
        reason = f"~{estimate:,} non-zeros (from {SAMPLED_BLOCKS} feature blocks) > {limit:,}"
        return replace(plan, reason=f"{plan.reason}; {reason}: not sparse either"), None
    data = read_sparse_fit_arrays(root, name, groups, features=features, max_nonzero=limit)
    if data is None:
        return replace(
            plan, reason=f"{plan.reason}; > {limit:,} non-zeros: not sparse either"
        ), None
    sparse = plan_fit(
        n_cells=n_cells,
        entries_per_cell=len(features),
        budget=budget,
        mode=mode,
        nonzero=data.y.nnz,
    )
    return sparse, data


def filter_features(
    root: zarr.Group,
    name: str,
    groups: GroupAssignment,
    log: logging.Logger | None = None,
    *,
    use_dask: bool | None = None,
) -> FilterFlags:
    """The feature filters (docs/model.md, section 4) on the fit cells; writes `prep/<name>/`
    (complete last).

    `use_dask`: compute the flags with Dask over the store's chunks (`tasks.distributed`,
    the same values); None (default) does so when this runs on a Dask worker, i.e. when the
    flow runs with a DaskTaskRunner.
    """
    log = log or logger
    distribution = root[inputs_key(name)].attrs["distribution"]
    if use_dask if use_dask is not None else on_dask_worker():
        log.info("Modality '%s': filter statistics computed with Dask", name)
        flags = dask_flags(store_path(root), name, groups, distribution)
    else:
        flags = block_flags(root, name, groups)
    excluded = flags.ntc_excluded_from_fit
    if excluded.all():
        raise NoFeaturesLeftError(
            f"Modality '{name}': all {len(excluded)} features were excluded by the NTC filters "
            f"({_reasons(flags)}); check that the matrix holds NTC cells with counts."
        )
    group = fresh_group(root, prep_key(name), "bayesdream-filters", distribution=distribution)
    for flag, values in flags.as_dict().items():
        write_array(group, flag, values, dims=(FEATURE,))
    write_coordinates(group, features=read_strings(root[inputs_key(name)], "feature_names"))
    mark_complete(group)
    if excluded.any():
        log.warning(
            "Modality '%s': %d features excluded (%s)", name, excluded.sum(), _reasons(flags)
        )
    return flags


def block_flags(root: zarr.Group, name: str, groups: GroupAssignment) -> FilterFlags:
    """The family's flags, one block of features at a time (every filter is per feature),
    so memory holds [fit cells x FEATURE_CHUNK], never the whole fit matrix."""
    family = get_family(root[inputs_key(name)].attrs["distribution"])
    n_features = root[inputs_key(name)]["counts"].shape[0]
    parts = [
        family.flags(
            read_fit_arrays(
                root, name, groups, features=np.arange(s, min(s + FEATURE_CHUNK, n_features))
            )
        )
        for s in range(0, n_features, FEATURE_CHUNK)
    ]
    return FilterFlags(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("ntc_zero_count", "ntc_zero_std", "ntc_single_category")
        )
    )


def _reasons(flags: FilterFlags) -> str:
    """Count each exclusion reason."""
    return ", ".join(
        f"{name}: {int(values.sum())}"
        for name, values in flags.as_dict().items()
        if name.startswith("ntc_") and name != "ntc_excluded_from_fit"
    )


def read_flags(root: zarr.Group, name: str) -> FilterFlags:
    """The flags written by `filter_features`."""
    group = root[prep_key(name)]
    return FilterFlags(
        ntc_zero_count=group["ntc_zero_count"][...],
        ntc_zero_std=group["ntc_zero_std"][...],
        ntc_single_category=group["ntc_single_category"][...],
    )
