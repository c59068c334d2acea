"""The interface every matrix reader offers: names, shape, blocks of feature rows (its own
module, so that the readers of each format and `readers.open_matrix`, which picks one,
import it without importing each other)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


class MatrixReader:
    """Base reader: names, shape and block iteration over feature rows."""

    path: Path
    feature_names: np.ndarray
    cell_ids: np.ndarray
    shape: tuple[int, ...]

    def iter_feature_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(start, dense float32 block [rows, N(, K)])` over all features."""
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        for start in range(0, self.shape[0], block_rows):
            stop = min(start + block_rows, self.shape[0])
            yield start, self._rows(start, stop)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError
