"""Per-feature statistics of a sparse fit matrix, read from its non-zero entries.

The negbinom priors and initial values are per-feature sums, means and a robust sd over
all fit cells. Over droplet counts (~90 % zeros) making every feature dense to compute
them costs O(N T) per fit; here the sums cost O(non-zeros), and a median is needed only
where a feature's counts are not mostly zeros: where more than half of a feature's
values are 0, its median and its MAD are 0 (the middle values of the sorted column are
zeros), so `robust_sd` falls back to the plain sd, which is a sum over the non-zeros
(plus the zeros' share, (0 - mean)² each). Only the other features are made dense, a
block at a time, and go through `robust_sd` itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bayesdream_model.sparse import SparseCounts, block_width
from bayesdream_model.stats import robust_sd

CHUNK_ENTRIES = 1 << 24  # non-zeros per piece of columns (a few hundred MB of temporaries)


def as_sparse(y: np.ndarray | SparseCounts) -> SparseCounts:
    """The non-zeros of a dense fit matrix, or the sparse one itself."""
    return y if isinstance(y, SparseCounts) else SparseCounts.from_dense(y)


def column_chunks(y: SparseCounts, entries: int = CHUNK_ENTRIES) -> Iterator[tuple[int, int]]:
    """(first, stop) column ranges of about `entries` non-zeros each (at least one column)."""
    n = y.shape[1]
    lo = 0
    while lo < n:
        hi = int(np.searchsorted(y.indptr, y.indptr[lo] + entries, side="right")) - 1
        hi = min(n, max(hi, lo + 1))
        yield lo, hi
        lo = hi


def scaled_group_sums(
    y: SparseCounts, row_scale: np.ndarray, groups: np.ndarray, n_groups: int
) -> np.ndarray:
    """Σ over the cells of each group of y / row_scale: [C, T] float64."""
    n_features = y.shape[1]
    out = np.zeros((n_groups, n_features))
    for lo, hi in column_chunks(y):
        part = y.select_features(slice(lo, hi))
        v = part.values / row_scale[part.rows]
        key = groups[part.rows].astype(np.int64) * (hi - lo) + part.column_of_entries()
        out[:, lo:hi] = np.bincount(key, weights=v, minlength=n_groups * (hi - lo)).reshape(
            n_groups, hi - lo
        )
    return out


def scaled_robust_sd(y: SparseCounts, row_scale: np.ndarray, *, epsilon: float) -> np.ndarray:
    """`robust_sd(y / row_scale[:, None], epsilon=epsilon)` per feature [T] (float64)."""
    n_cells, n_features = y.shape
    zeros = n_cells - np.diff(y.indptr)
    out = np.empty(n_features)
    mostly_zero = zeros > n_cells // 2  # median 0 and MAD 0: the plain sd
    for lo, hi in column_chunks(y):
        part = y.select_features(slice(lo, hi))
        v = part.values / row_scale[part.rows]
        column = part.column_of_entries()
        mean = np.bincount(column, weights=v, minlength=hi - lo) / n_cells
        squares = np.bincount(column, weights=(v - mean[column]) ** 2, minlength=hi - lo)
        out[lo:hi] = np.sqrt((squares + zeros[lo:hi] * mean**2) / n_cells)
    others = np.flatnonzero(~mostly_zero)
    width = block_width(n_cells)
    for start in range(0, others.size, width):
        columns = others[start : start + width]
        block = y.select_features(columns).dense() / row_scale[:, None]
        out[columns] = robust_sd(block, epsilon=epsilon)
    return out
