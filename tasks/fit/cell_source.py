"""The fit cells read from the store in pieces: batches of cells, blocks of features.

`StoreCells` is the `bayesdream_model.streaming.CellSource` of a modality's store arrays.
Batches follow the store's cell chunks, so that an epoch decompresses every chunk once:
whole chunks are packed into a batch up to the batch size, and a chunk holding more fit
cells than that is split evenly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zarr

from bayesdream_model.data import FitArrays
from bayesdream_model.streaming import size_factor_range
from tasks.selection import FitSelection, read_columns
from tasks.store import CELL_CHUNK, FEATURE_CHUNK, inputs_key


def chunk_batches(cells: np.ndarray, batch_cells: int, chunk: int = CELL_CHUNK) -> np.ndarray:
    """Boundaries (into the sorted `cells`) of batches of at most `batch_cells` cells that
    never split a store chunk unless the chunk alone holds more than `batch_cells`."""
    starts = np.flatnonzero(np.diff(cells // chunk, prepend=-1))
    runs = np.append(starts, len(cells))
    bounds, current = [0], 0
    for lo, hi in zip(runs[:-1], runs[1:], strict=True):
        size = hi - lo
        if size > batch_cells:  # this chunk alone: even parts
            if lo > current:
                bounds.append(lo)
            parts = -(-size // batch_cells)
            bounds.extend(np.linspace(lo, hi, parts + 1).round().astype(int)[1:].tolist())
            current = hi
        elif hi - current > batch_cells:
            bounds.append(lo)
            current = lo
    if bounds[-1] != len(cells):
        bounds.append(len(cells))
    return np.asarray(bounds, dtype=np.int64)


class StoreCells:
    """A modality's fit cells x fit features, read from the store on demand."""

    def __init__(self, root: zarr.Group, selection: FitSelection, *, batch_cells: int) -> None:
        self.root, self.name, self.groups = root, selection.name, selection.groups
        self.family, self.features = selection.family, selection.features
        self.cells, self.codes = selection.cells, selection.codes
        self.sum_factor = selection.sum_factor
        self.sf_range = size_factor_range(self.sum_factor)
        self.n_cells, self.n_features = len(self.cells), len(self.features)
        self.n_groups = selection.n_groups
        chunk = root[inputs_key(self.name)]["counts"].chunks[1]
        self.bounds = chunk_batches(self.cells, batch_cells, chunk)

    @property
    def n_batches(self) -> int:
        """Number of cell batches."""
        return len(self.bounds) - 1

    def read_batch(self, index: int) -> FitArrays:
        """Batch `index`: its cells x every fit feature, from the store."""
        return self._arrays(slice(self.bounds[index], self.bounds[index + 1]), self.features)

    def feature_blocks(self) -> Iterator[FitArrays]:
        """Every fit cell x FEATURE_CHUNK fit features at a time."""
        for start in range(0, self.n_features, FEATURE_CHUNK):
            yield self._arrays(slice(None), self.features[start : start + FEATURE_CHUNK])

    def _arrays(self, rows: slice, features: np.ndarray) -> FitArrays:
        """The fit cells `rows` (positions among the fit cells) x `features`."""
        group = self.root[inputs_key(self.name)]
        cells = self.cells[rows]
        denominator = None
        if self.family.spec.needs_denominator:
            denominator = read_columns(group["denominator"], cells, features)
        return FitArrays(
            y=read_columns(group["counts"], cells, features),
            groups=self.codes[rows],
            n_groups=self.n_groups,
            sum_factor=None if self.sum_factor is None else self.sum_factor[rows],
            denominator=denominator,
            sf_range=self.sf_range,
        )
