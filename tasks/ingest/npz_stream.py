"""A CSR `.npz` (scipy.sparse.save_npz) read block by block, never whole.

`scipy.sparse.load_npz` holds every non-zero in memory (about 12 bytes each: a 200,000 x
30,000 screen with 10 % non-zeros needs ~7 GB). Here only `indptr` is read whole; the
`data` and `indices` members are decompressed as two sequential streams, one block of
feature rows at a time, so memory stays at one dense block.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from numpy.lib import format as npformat

from tasks.errors import InputDataError
from tasks.ingest.reader_base import MatrixReader


class _Stream:
    """One `.npy` member of the archive, read front to back."""

    def __init__(self, archive: zipfile.ZipFile, name: str) -> None:
        self.handle = archive.open(name)
        version = npformat.read_magic(self.handle)
        reader = (
            npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        )
        shape, _, self.dtype = reader(self.handle)
        self.length = int(np.prod(shape))

    def read(self, count: int) -> np.ndarray:
        """The next `count` values."""
        raw = self.handle.read(count * self.dtype.itemsize)
        return np.frombuffer(raw, dtype=self.dtype, count=count)


def is_streamable(path: Path) -> bool:
    """A CSR archive written by `save_npz` (CSC and COO are read whole instead)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "format.npy" not in archive.namelist():
                return False
            with archive.open("format.npy") as handle:
                fmt = np.lib.format.read_array(handle, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    value = fmt.item()
    return (value.decode() if isinstance(value, bytes) else str(value)) == "csr"


class StreamingCSRReader(MatrixReader):
    """Rows (features) of a CSR archive, densified one block at a time."""

    def __init__(self, path: Path, *, feature_names: np.ndarray, cell_ids: np.ndarray) -> None:
        self.path, self.feature_names, self.cell_ids = path, feature_names, cell_ids
        with zipfile.ZipFile(path) as archive:
            with archive.open("indptr.npy") as handle:
                self.indptr = np.lib.format.read_array(handle).astype(np.int64)
            with archive.open("shape.npy") as handle:
                self.shape = tuple(int(d) for d in np.lib.format.read_array(handle))
            header = _Stream(archive, "data.npy")  # version 1.0 or 2.0 headers
            dtype = header.dtype
            header.handle.close()
        if dtype.kind not in "biuf":
            raise InputDataError(
                f"Matrix '{path}' has dtype {dtype}; expected numbers (int, float, bool)."
            )

    def iter_feature_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(start, dense float32 [rows, N])`, reading the archive front to back."""
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        with zipfile.ZipFile(self.path) as archive:
            data, indices = _Stream(archive, "data.npy"), _Stream(archive, "indices.npy")
            for start in range(0, self.shape[0], block_rows):
                stop = min(start + block_rows, self.shape[0])
                yield start, self._block(data, indices, start, stop)

    def _block(self, data: _Stream, indices: _Stream, start: int, stop: int) -> np.ndarray:
        count = int(self.indptr[stop] - self.indptr[start])
        values, columns = data.read(count), indices.read(count)
        local = self.indptr[start : stop + 1] - self.indptr[start]
        values = values.astype(np.float32, copy=False)  # cast the non-zeros, not the block
        rows = sp.csr_matrix((values, columns, local), shape=(stop - start, self.shape[1]))
        return rows.toarray()  # float32 directly; sums duplicates, as scipy does
