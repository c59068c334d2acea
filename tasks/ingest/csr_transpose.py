"""A cells-major CSR matrix (AnnData's usual layout) read as feature blocks, in one pass.

A CSR layer of cells x features stores each cell's non-zeros together, so the non-zeros of
a block of features are spread over the whole layer. Reading the layer once per feature
block would take T / 512 passes over it. Instead one pass reads the layer a few million
non-zeros at a time (never whole), sorts each slice by feature (`tocsc`, in C) and appends
its entries to the bucket of their feature block; then every bucket becomes one dense
block [features, cells]. Memory holds one slice, one bucket and one dense block.

The buckets stay in memory when all the layer's entries (10 bytes each) fit in the
budget the caller gives (one dense block, as the `.npz` reader holds); otherwise they are
appended to temporary files (in `$TMPDIR`, removed at the end), about 10 bytes per
non-zero of disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from tasks.errors import PipelineError

logger = logging.getLogger(__name__)

SLICE_ENTRIES = 1 << 21  # non-zeros read from the layer at a time
ENTRY = np.dtype([("feature", "<u2"), ("cell", "<i4"), ("value", "<f4")])  # 10 bytes


class Buckets:
    """Entries grouped by feature block: in memory, or appended to one file per block."""

    def __init__(self, n_blocks: int, spill_dir: Path | None) -> None:
        self.spill_dir = spill_dir
        self.parts: list[list[np.ndarray]] = [[] for _ in range(n_blocks)]

    def add(self, block: int, entries: np.ndarray) -> None:
        """Append entries (ENTRY records) to a block's bucket."""
        if self.spill_dir is None:
            self.parts[block].append(entries)
            return
        with open(self.spill_dir / f"{block}.bin", "ab") as handle:
            entries.tofile(handle)

    def take(self, block: int) -> np.ndarray:
        """All of a block's entries; the bucket is emptied."""
        if self.spill_dir is None:
            parts, self.parts[block] = self.parts[block], []
            return np.concatenate(parts) if parts else np.empty(0, ENTRY)
        file = self.spill_dir / f"{block}.bin"
        if not file.exists():
            return np.empty(0, ENTRY)
        entries = np.fromfile(file, dtype=ENTRY)
        file.unlink()
        return entries


def row_slices(indptr: np.ndarray, entries: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of about `entries` non-zeros each (at least one row each)."""
    n_rows, nnz = len(indptr) - 1, int(indptr[-1])
    cuts = np.searchsorted(indptr, np.arange(entries, nnz, entries), side="left")
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, n_rows), [n_rows]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def feature_blocks(
    group: Any,
    shape: tuple[int, int],
    *,
    block_rows: int,
    budget_bytes: int,
    label: str,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(start, dense float32 [rows, cells])` over the features of a CSR group
    (`data`, `indices`, `indptr`; shape = (cells, features)), reading it once."""
    if not 0 < block_rows < 1 << 16:
        raise ValueError(f"block_rows must be in 1..65535, got {block_rows}")
    n_cells, n_features = shape
    n_blocks = -(-n_features // block_rows)
    indptr = np.asarray(group["indptr"][...], dtype=np.int64)
    nnz = int(indptr[-1])
    spill = None if nnz * ENTRY.itemsize <= budget_bytes else _spill_dir(nnz, label)
    try:
        buckets = Buckets(n_blocks, spill)
        for r0, r1 in row_slices(indptr, SLICE_ENTRIES):
            _bucket_rows(group, indptr, (r0, r1), n_features, block_rows, buckets)
        for block in range(n_blocks):
            start = block * block_rows
            rows = min(block_rows, n_features - start)
            entries = buckets.take(block)
            dense = sp.coo_matrix(
                (entries["value"], (entries["feature"].astype(np.int32), entries["cell"])),
                shape=(rows, n_cells),
            ).toarray()  # sums duplicates, as scipy does
            del entries
            yield start, dense
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)


def _bucket_rows(
    group: Any,
    indptr: np.ndarray,
    rows: tuple[int, int],
    n_features: int,
    block_rows: int,
    buckets: Buckets,
) -> None:
    """Sort one slice of rows (cells) by feature and add its entries to their blocks."""
    r0, r1 = rows
    a, b = int(indptr[r0]), int(indptr[r1])
    if a == b:
        return
    data = np.asarray(group["data"][a:b]).astype(np.float32, copy=False)
    indices = np.asarray(group["indices"][a:b])
    local = indptr[r0 : r1 + 1] - a
    by_feature = sp.csr_matrix((data, indices, local), shape=(r1 - r0, n_features)).tocsc()
    del data, indices
    pointer = by_feature.indptr
    for block, start in enumerate(range(0, n_features, block_rows)):
        stop = min(start + block_rows, n_features)
        p, q = int(pointer[start]), int(pointer[stop])
        if p == q:
            continue
        entries = np.empty(q - p, dtype=ENTRY)
        counts = np.diff(pointer[start : stop + 1])
        entries["feature"] = np.repeat(np.arange(stop - start, dtype=np.uint16), counts)
        entries["cell"] = by_feature.indices[p:q] + r0
        entries["value"] = by_feature.data[p:q]
        buckets.add(block, entries)


def _spill_dir(nnz: int, label: str) -> Path:
    """A temporary folder for the buckets; refuse to start when its disk is too small."""
    base = Path(tempfile.gettempdir())
    need = nnz * ENTRY.itemsize
    free = shutil.disk_usage(base).free
    if need > 0.95 * free:
        raise PipelineError(
            f"{label} is cells-major (CSR): reading it by features needs {need / 1e9:.1f} GB "
            f"of temporary files but '{base}' has {free / 1e9:.1f} GB free; point TMPDIR at "
            "a larger disk, or store the layer as CSC (`adata.layers[name] = "
            "adata.layers[name].tocsc()`), which is read by features directly."
        )
    folder = Path(tempfile.mkdtemp(prefix="bayesdream-csr-", dir=base))
    logger.info(
        "%s is cells-major (CSR) and larger than one feature block: grouping its %d "
        "non-zeros by feature through %.2f GB of temporary files in '%s' (pid %d).",
        label,
        nnz,
        need / 1e9,
        folder,
        os.getpid(),
    )
    return folder
