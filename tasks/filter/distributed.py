"""The NTC filter statistics computed with Dask over the store's chunks, on a cluster.

The flags of each family are per-feature independent, so they are computed one block of
features at a time: `inputs/<name>/counts` ([T, N(, K)], features are rows) is read with
`dask.array.from_zarr`, restricted to the fit cells' columns and rechunked so that each
block holds ALL fit cells for a run of features; every block goes through the family's own
`flags` and the [t, 3] results are concatenated over the feature blocks. The numbers are
those of the in-memory path (`tasks.selection.read_fit_arrays` + `flags`) bit for bit: a
block is laid out as `read_fit_arrays` lays out the whole matrix ([N_fit, t(, K)] float32,
C order), and no block holds a single feature where the matrix has several (numpy sums a
lone column pairwise, and a column of a wider matrix sequentially: the last bits differ).

The store path must be readable at the same path by every Dask worker (one machine, or a
shared file system).
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import zarr

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import FilterFlags, get_family
from tasks.errors import StoreError
from tasks.groups import GroupAssignment
from tasks.selection import fit_cell_index
from tasks.store import inputs_key, open_root

#: target size of one block of counts (float32) held by a Dask task
BLOCK_BYTES = 64 * 2**20
FLAG_NAMES: tuple[str, ...] = tuple(f.name for f in fields(FilterFlags))


def on_dask_worker() -> bool:
    """True inside a task that a Dask worker runs (e.g. under the flow's DaskTaskRunner)."""
    if "distributed" not in sys.modules:  # never imported: cannot be a worker
        return False
    import distributed

    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def store_path(root: zarr.Group) -> str:
    """The file-system path of a store opened from disk (what Dask workers open again)."""
    path = getattr(root.store, "root", None)
    if path is None:
        raise StoreError(
            f"Store '{root.store}' is not a local directory store, so Dask workers cannot "
            "open it by path; compute the filters in memory (use_dask=False)."
        )
    return str(path)


def dask_flags(
    store_path: str | Path,
    name: str,
    groups: GroupAssignment,
    family_name: str,
    *,
    block_features: int | None = None,
) -> FilterFlags:
    """The family's `flags` of modality `name`'s fit cells, one feature block per Dask task.

    `block_features` sets the features per block (default: the store's feature chunk, fewer
    when a block of all fit cells would exceed `BLOCK_BYTES`). Computed on the Dask cluster
    this runs on (inside a worker), else on the current `distributed` client, else on
    Dask's local threads.
    """
    stacked = _compute(
        flag_blocks(store_path, name, groups, family_name, block_features=block_features)
    )
    return FilterFlags(**{flag: stacked[:, i] for i, flag in enumerate(FLAG_NAMES)})


def flag_blocks(
    store_path: str | Path,
    name: str,
    groups: GroupAssignment,
    family_name: str,
    *,
    block_features: int | None = None,
):
    """The lazy [T, 3] bool Dask array of flags (columns in `FLAG_NAMES` order)."""
    import dask
    import dask.array as da

    path = str(store_path)
    cells = fit_cell_index(open_root(path), name, groups)
    family = get_family(family_name)
    arrays = ["counts", "denominator"] if family.spec.needs_denominator else ["counts"]
    # [T, N(, K)] -> the fit cells' columns [T, N_fit(, K)]
    columns = [
        da.from_zarr(path, component=f"{inputs_key(name)}/{array}")[:, cells] for array in arrays
    ]
    rows = _block_rows(columns[0], len(arrays), block_features)
    # each block: `rows` features x ALL fit cells (x K), so a block's flags are final
    blocks = _feature_blocks(columns[0].shape[0], rows)
    columns = [c.rechunk((blocks, len(cells), *c.shape[2:])) for c in columns]
    return da.map_blocks(
        _block_flags,
        *columns,
        family_name=family_name,
        groups=dask.delayed(groups.code[cells], pure=True),  # one graph key, not one per block
        n_groups=len(groups.labels),
        chunks=(blocks, (len(FLAG_NAMES),)),
        drop_axis=list(range(2, columns[0].ndim)),
        dtype=bool,
        token="bayesdream-flags",
    )


def _block_rows(counts, n_arrays: int, block_features: int | None) -> int:
    """Features per block: the store's feature chunk, capped by `BLOCK_BYTES`; at least 2."""
    if block_features is not None:
        return max(2, int(block_features))
    per_feature = 4 * n_arrays * int(np.prod(counts.shape[1:], dtype=np.int64))  # float32
    return max(2, min(int(counts.chunksize[0]), BLOCK_BYTES // max(per_feature, 1)))


def _feature_blocks(n_features: int, rows: int) -> tuple[int, ...]:
    """Block sizes along the features; a last block of one feature joins the one before."""
    sizes = [rows] * (n_features // rows) + ([n_features % rows] if n_features % rows else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return tuple(sizes) or (0,)


def _block_flags(
    counts: np.ndarray,
    *denominator: np.ndarray,
    family_name: str,
    groups: np.ndarray,
    n_groups: int,
) -> np.ndarray:
    """[t, 3] flags of one feature block [t, N_fit(, K)] (+ its denominator block)."""

    def as_cells(block: np.ndarray) -> np.ndarray:  # [N_fit, t(, K)] float32, C order
        return np.ascontiguousarray(np.swapaxes(block, 0, 1), dtype=np.float32)

    data = FitArrays(
        y=as_cells(counts),
        groups=groups,
        n_groups=n_groups,
        denominator=as_cells(denominator[0]) if denominator else None,
    )
    flags = get_family(family_name).flags(data).as_dict()
    return np.stack([np.asarray(flags[flag], dtype=bool) for flag in FLAG_NAMES], axis=1)


def _compute(collection) -> np.ndarray:
    """On a Dask worker: on its cluster, seceding from the worker's thread while waiting
    (a waiting task would otherwise hold the thread its blocks need, and with one thread
    per worker two modalities' filters would deadlock); else on the current client; else
    on Dask's local threads."""
    if on_dask_worker():
        import distributed

        with distributed.worker_client() as client:
            return client.compute(collection).result()
    try:
        import distributed

        client = distributed.get_client()
    except (ImportError, ValueError):
        return collection.compute(scheduler="threads")
    return client.compute(collection).result()
