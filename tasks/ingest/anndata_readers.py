"""Matrices in AnnData / MuData files (`.h5ad`, `.h5mu`, AnnData `.zarr`), read by features.

AnnData stores cells x features; the store wants features x cells, one block of features
at a time. How a block is read depends on the matrix's encoding:

- dense (an HDF5 dataset / Zarr array): a column slab `x[:, start:stop]`, transposed;
- CSC (features-major): the block's non-zeros are one contiguous range of `data` and
  `indices`, sliced directly (as the `.npz` reader does with CSR);
- CSR (cells-major, AnnData's default): one pass over the layer, bucketed by feature
  block (`tasks.ingest.csr_transpose`).

Never is more than one dense block (plus, for CSR, one slice of the layer) in memory.
Feature names come from `var` (`raw/var` for `layer: raw`), cell ids from `obs`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from tasks.anndata_files import (
    Selection,
    attr_str,
    dataframe_index,
    is_group,
    open_file,
    select,
)
from tasks.errors import InputDataError
from tasks.ingest import csr_transpose
from tasks.ingest.reader_base import MatrixReader

logger = logging.getLogger(__name__)

DENSE, CSR, CSC = "array", "csr_matrix", "csc_matrix"


@dataclass(frozen=True)
class _Layout:
    """How the matrix is stored: encoding, shape (cells, features) and dtype."""

    encoding: str
    shape: tuple[int, int]
    dtype: np.dtype


def open_anndata_matrix(
    path: Path, *, modality: str | None = None, layer: str | None = None
) -> MatrixReader:
    """A reader of `layer` (default X) of an AnnData file or a MuData modality."""
    with open_file(path) as root:
        selection = select(path, root, modality=modality, layer=layer)
        layout = _layout(root, selection)
        cells = dataframe_index(root, selection.obs_key, path)
        features = dataframe_index(root, selection.var_key, path)
    reader_class = {DENSE: DenseLayerReader, CSC: CSCLayerReader, CSR: CSRLayerReader}
    reader = reader_class[layout.encoding](selection, layout, features=features, cells=cells)
    _check_axes(reader, layout)
    return reader


def _layout(root, selection: Selection) -> _Layout:
    """Encoding, shape and dtype of the selected matrix; unsupported encodings refused."""
    node = root[selection.matrix_key]
    if not is_group(node):
        if node.ndim != 2:
            raise InputDataError(
                f"{selection.describe()}: '{selection.matrix_key}' has shape {node.shape}; "
                "expected cells x features."
            )
        return _Layout(DENSE, tuple(int(d) for d in node.shape), np.dtype(node.dtype))
    attrs = node.attrs
    kind = attr_str(attrs.get("encoding-type", attrs.get("h5sparse_format", "")))
    shape = tuple(int(d) for d in attrs.get("shape", attrs.get("h5sparse_shape", ())))
    encoding = {"csr": CSR, "csr_matrix": CSR, "csc": CSC, "csc_matrix": CSC}.get(kind)
    if encoding is None or len(shape) != 2 or "data" not in node:
        raise InputDataError(
            f"{selection.describe()}: '{selection.matrix_key}' has encoding '{kind}'; "
            "expected a dense array or a csr_matrix / csc_matrix."
        )
    return _Layout(encoding, shape, np.dtype(node["data"].dtype))


def _check_axes(reader: MatrixReader, layout: _Layout) -> None:
    """Numbers only; as many obs/var names as the matrix has cells/features."""
    selection = reader.selection
    if layout.dtype.kind not in "biuf":
        raise InputDataError(
            f"{selection.describe()} has dtype {layout.dtype}; expected numbers (int, float, bool)."
        )
    n_cells, n_features = layout.shape
    for names, expected, table in [
        (reader.cell_ids, n_cells, selection.obs_key),
        (reader.feature_names, n_features, selection.var_key),
    ]:
        if len(names) != expected:
            raise InputDataError(
                f"{selection.describe()}: '{table}' lists {len(names)} names but the matrix "
                f"'{selection.matrix_key}' has shape {layout.shape} (cells x features)."
            )


class _LayerReader(MatrixReader):
    """Names, shape (features, cells) and where the matrix is."""

    def __init__(
        self, selection: Selection, layout: _Layout, *, features: np.ndarray, cells: np.ndarray
    ) -> None:
        self.selection, self.layout = selection, layout
        self.path = selection.path
        self.feature_names, self.cell_ids = features, cells
        self.shape = (layout.shape[1], layout.shape[0])

    def iter_feature_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(start, dense float32 [rows, cells])`, the file open for the pass."""
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        with open_file(self.path) as root:
            yield from self._blocks(root[self.selection.matrix_key], block_rows)

    def _blocks(self, node, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError


class DenseLayerReader(_LayerReader):
    """A dense cells x features array, read a slab of feature columns at a time."""

    def _blocks(self, node, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.shape[0], block_rows):
            stop = min(start + block_rows, self.shape[0])
            slab = np.asarray(node[:, start:stop])
            yield start, np.ascontiguousarray(slab.T, dtype=np.float32)


class CSCLayerReader(_LayerReader):
    """CSC (features-major): a block's non-zeros are one contiguous slice."""

    def _blocks(self, node, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        indptr = np.asarray(node["indptr"][...], dtype=np.int64)  # [features + 1]
        n_cells = self.shape[1]
        for start in range(0, self.shape[0], block_rows):
            stop = min(start + block_rows, self.shape[0])
            a, b = int(indptr[start]), int(indptr[stop])
            values = np.asarray(node["data"][a:b]).astype(np.float32, copy=False)
            rows = sp.csr_matrix(
                (values, np.asarray(node["indices"][a:b]), indptr[start : stop + 1] - a),
                shape=(stop - start, n_cells),
            )
            yield start, rows.toarray()  # sums duplicates, as scipy does


class CSRLayerReader(_LayerReader):
    """CSR (cells-major): one pass, bucketed by feature block (`csr_transpose`)."""

    def _blocks(self, node, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        n_cells = self.shape[1]
        yield from csr_transpose.feature_blocks(
            node,
            self.layout.shape,
            block_rows=block_rows,
            budget_bytes=block_rows * n_cells * 4,  # one dense float32 block
            label=self.selection.describe(),
        )
