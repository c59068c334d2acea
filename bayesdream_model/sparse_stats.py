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

from bayesdream_model.sparse import SparseCounts, block_width, column_runs
from bayesdream_model.stats import robust_sd

CHUNK_ENTRIES = 1 << 24  # non-zeros per piece of columns (a few hundred MB of temporaries)


def scaled_chunks(
    y: SparseCounts, row_scale: np.ndarray, entries: int | None = None
) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
    """(columns, rows, y / row_scale[rows], column within the piece) of each entry, over
    runs of columns of about `entries` non-zeros each (at least one column)."""
    for lo, hi in column_runs(y.indptr, CHUNK_ENTRIES if entries is None else entries):
        span = slice(y.indptr[lo], y.indptr[hi])
        rows = y.rows[span]
        column = np.repeat(np.arange(hi - lo), np.diff(y.indptr[lo : hi + 1]))
        yield slice(lo, hi), rows, y.values[span] / row_scale[rows], column


def scaled_group_sums(
    y: SparseCounts, row_scale: np.ndarray, groups: np.ndarray, n_groups: int
) -> np.ndarray:
    """Σ over the cells of each group of y / row_scale: [C, T] float64."""
    out = np.zeros((n_groups, y.shape[1]))
    for columns, rows, v, column in scaled_chunks(y, row_scale):
        width = columns.stop - columns.start
        key = groups[rows].astype(np.int64) * width + column
        out[:, columns] = np.bincount(key, weights=v, minlength=n_groups * width).reshape(
            n_groups, width
        )
    return out


def scaled_robust_sd(y: SparseCounts, row_scale: np.ndarray, *, epsilon: float) -> np.ndarray:
    """`robust_sd(y / row_scale[:, None], epsilon=epsilon)` per feature [T] (float64)."""
    n_cells, n_features = y.shape
    zeros = n_cells - np.diff(y.indptr)
    out = np.empty(n_features)
    for columns, _, v, column in scaled_chunks(y, row_scale):
        width = columns.stop - columns.start
        mean = np.bincount(column, weights=v, minlength=width) / n_cells
        squares = np.bincount(column, weights=(v - mean[column]) ** 2, minlength=width)
        out[columns] = np.sqrt((squares + zeros[columns] * mean**2) / n_cells)
    others = np.flatnonzero(zeros <= n_cells // 2)  # the rest: median and MAD 0, plain sd
    width = block_width(n_cells)
    for start in range(0, others.size, width):
        columns = others[start : start + width]
        block = y.select_features(columns).dense() / row_scale[:, None]
        out[columns] = robust_sd(block, epsilon=epsilon)
    return out
