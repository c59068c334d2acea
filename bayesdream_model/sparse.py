"""A fit matrix kept as its non-zero entries, by feature (compressed sparse columns).

Droplet counts are ~90 % zeros, and the negbinom likelihood reads the data only through
per-group totals, per-feature value histograms and a pass over the non-zero entries
(`bayesdream_model.distributions.negbinom`), so its fit matrix need not be held dense.
Columns are the unit because the store is read one block of features at a time and every
prior and filter is per feature; numpy only (the model package does not import scipy).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from bayesdream_model.errors import ModelError


@dataclass(frozen=True)
class SparseCounts:
    """[N, T] cells x features: column t's entries are `rows` / `values`
    [indptr[t]:indptr[t + 1]] (rows increasing within a column, values non-zero)."""

    indptr: np.ndarray  # [T + 1] int64
    rows: np.ndarray  # [nnz] int32
    values: np.ndarray  # [nnz] float32
    n_rows: int

    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        """(N, T), as a dense matrix's."""
        return self.n_rows, len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) entries."""
        return int(self.indptr[-1])

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.indptr.nbytes + self.rows.nbytes + self.values.nbytes

    @classmethod
    def from_dense(cls, y: np.ndarray) -> SparseCounts:
        """The non-zeros of a dense [N, T] matrix."""
        return cls.from_blocks([y], n_rows=y.shape[0])

    @classmethod
    def from_blocks(cls, blocks: Iterable[np.ndarray], *, n_rows: int) -> SparseCounts:
        """Join dense column blocks [N, t_b] (every cell, consecutive features), keeping only
        the non-zeros of each as it arrives: memory holds one dense block at a time."""
        counts, rows, values = [np.zeros(1, dtype=np.int64)], [], []
        for block in blocks:
            if block.ndim != 2 or block.shape[0] != n_rows:
                raise ModelError(
                    f"A block of the fit matrix has shape {block.shape}; expected "
                    f"[{n_rows} cells, features]: pass 2-D blocks of every fit cell."
                )
            cells, cols, found = _entries_by_column(block)
            counts.append(np.bincount(cols, minlength=block.shape[1]))
            rows.append(cells.astype(np.int32))
            values.append(found.astype(np.float32))
        return cls(
            indptr=np.cumsum(np.concatenate(counts)),
            rows=np.concatenate(rows) if rows else np.zeros(0, np.int32),
            values=np.concatenate(values) if values else np.zeros(0, np.float32),
            n_rows=n_rows,
        )

    def column_of_entries(self) -> np.ndarray:
        """The feature of every entry [nnz] (int64)."""
        return np.repeat(np.arange(self.shape[1]), np.diff(self.indptr))

    def dense(self) -> np.ndarray:
        """The dense [N, T] float32 matrix."""
        out = np.zeros(self.shape, dtype=np.float32)
        out[self.rows, self.column_of_entries()] = self.values
        return out

    def select_features(self, keep) -> SparseCounts:
        """Columns `keep` (a slice, bool mask [T] or indices), in that order."""
        if isinstance(keep, slice) and keep.step in (None, 1):  # one run of entries
            lo, hi, _ = keep.indices(self.shape[1])
            hi = max(lo, hi)
            span = slice(self.indptr[lo], self.indptr[hi])
            return SparseCounts(
                indptr=(self.indptr[lo : hi + 1] - self.indptr[lo]).astype(np.int64),
                rows=self.rows[span].copy(),
                values=self.values[span].copy(),
                n_rows=self.n_rows,
            )
        columns = np.arange(self.shape[1])[keep]
        starts, stops = self.indptr[columns], self.indptr[columns + 1]
        take = _ranges(starts, stops)
        return SparseCounts(
            indptr=np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64),
            rows=self.rows[take],
            values=self.values[take],
            n_rows=self.n_rows,
        )

    def select_rows(self, rows) -> SparseCounts:
        """Cells `rows` (a slice, bool mask [N] or distinct indices, kept in that order)."""
        picked = np.arange(self.n_rows)[rows]
        new = np.full(self.n_rows, -1, dtype=np.int64)
        new[picked] = np.arange(len(picked))
        where = new[self.rows]
        keep = where >= 0
        columns, kept = self.column_of_entries()[keep], where[keep]
        order = np.lexsort((kept, columns))  # rows increasing within a column
        counts = np.bincount(columns, minlength=self.shape[1])
        return SparseCounts(
            indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            rows=kept[order].astype(np.int32),
            values=self.values[keep][order],
            n_rows=len(picked),
        )

    def dense_blocks(self, width: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first feature, dense [N, <= width] block) over the columns, in order."""
        for start in range(0, self.shape[1], width):
            yield start, self.select_features(slice(start, start + width)).dense()

    def feature_blocks(
        self, width: int, positions: np.ndarray | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(first feature, dense float64 [<= width features, N] block) over the columns, in
        order; cell n at column `positions[n]` (a permutation; default: n). Filled in
        memory order, a feature's cells one run, into one buffer that every block reuses
        (each is overwritten by the next: use it before asking for the next); fresh
        blocks' first touch of their pages cost as much as filling them."""
        n_rows, n_features = self.n_rows, self.shape[1]
        buffer = np.empty((min(width, n_features), n_rows), dtype=np.float64)
        for start in range(0, n_features, width):
            stop = min(start + width, n_features)
            span = slice(self.indptr[start], self.indptr[stop])
            block = buffer[: stop - start]
            block.fill(0.0)
            offsets = np.arange(stop - start, dtype=np.int64) * n_rows
            flat = np.repeat(offsets, np.diff(self.indptr[start : stop + 1]))
            flat += self.rows[span] if positions is None else positions[self.rows[span]]
            block.ravel()[flat] = self.values[span]
            yield start, block


def as_sparse(y: np.ndarray | SparseCounts) -> SparseCounts:
    """The non-zeros of a dense fit matrix, or the sparse one itself."""
    return y if isinstance(y, SparseCounts) else SparseCounts.from_dense(y)


def _entries_by_column(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells, columns, values) of a dense block's non-zeros, column by column and cells
    increasing within each, found by a scan in memory order: a column-major block (as the
    store's feature-major reads hand out) is scanned as it lies; any other is scanned row
    by row and its entries then stably sorted by column (a radix sort under 32,768
    columns), 2-3x faster than `np.nonzero(block.T)`'s strided scan."""
    if block.flags.f_contiguous:
        by_column = block.T  # C-contiguous [T, N]
        flat = np.flatnonzero(by_column)
        cols, cells = np.divmod(flat, max(block.shape[0], 1))
        return cells, cols, by_column.ravel()[flat]
    block = np.ascontiguousarray(block)
    flat = np.flatnonzero(block)  # row-major: cells increasing
    cells, cols = np.divmod(flat, max(block.shape[1], 1))
    values = block.ravel()[flat]
    key = cols.astype(np.int16) if block.shape[1] < 2**15 else cols
    order = np.argsort(key, kind="stable")
    return cells[order], cols[order], values[order]


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The concatenated index ranges [start, stop) (int64)."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def block_width(n_rows: int, *, block_bytes: int = 64 * 2**20) -> int:
    """Features per dense float32 block of `n_rows` cells within `block_bytes`; at least 1."""
    return max(1, block_bytes // max(1, 4 * n_rows))


def column_runs(indptr: np.ndarray, max_entries: int) -> list[tuple[int, int]]:
    """Consecutive column ranges [lo, hi) of at most `max_entries` entries each (a column
    with more is a range of its own); none for a matrix without columns."""
    n_columns = len(indptr) - 1
    runs, lo = [], 0
    while lo < n_columns:
        hi = int(np.searchsorted(indptr, indptr[lo] + max_entries, side="right")) - 1
        hi = min(max(hi, lo + 1), n_columns)
        runs.append((lo, hi))
        lo = hi
    return runs
