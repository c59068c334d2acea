"""Uniform readers for features x cells (x K) matrices in the formats screens arrive in.

Every reader exposes `path`, `feature_names` [T], `cell_ids` [N], `shape` (T, N(, K))
and `iter_feature_blocks(block_rows)`, which yields `(start, block)` with `block` a
dense float32 array of `block_rows` features (fewer at the end). Only one block is
ever dense: sparse inputs are sliced by rows, CSV/TSV files are parsed in row chunks.

Formats (chosen by suffix): `.csv`/`.tsv`/`.txt` (optionally `.gz`; first column =
feature names, header = cell ids), `.npz` (scipy.sparse), `.npy` (memory-mapped),
a 10x Matrix Market folder, and AnnData / MuData files (`.h5ad`, `.h5mu`, AnnData
`.zarr`: cells x features, read by `tasks.ingest.anndata_readers`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from tasks.anndata_files import is_anndata_path
from tasks.errors import InputDataError
from tasks.ingest.anndata_readers import open_anndata_matrix
from tasks.ingest.npz_stream import StreamingCSRReader, is_streamable
from tasks.ingest.reader_base import MatrixReader

logger = logging.getLogger(__name__)

NameSource = Path | Sequence[str] | np.ndarray | None
DELIMITED = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
SUPPORTED = (
    ".csv, .tsv, .txt (optionally .gz), .npz, .npy, a 10x mtx folder, or AnnData/MuData "
    "(.h5ad, .h5mu, .zarr)"
)


class ArrayReader(MatrixReader):
    """An in-memory or memory-mapped matrix: dense ndarray, numpy.matrix or scipy sparse."""

    def __init__(
        self, matrix: Any, *, path: Path, feature_names: np.ndarray, cell_ids: np.ndarray
    ) -> None:
        if sp.issparse(matrix):
            matrix = matrix.tocsr()  # COO/CSC/... -> CSR: row slices are cheap
        elif not isinstance(matrix, np.ndarray) or isinstance(matrix, np.matrix):
            matrix = np.asarray(matrix)
        if matrix.dtype.kind not in "biuf":
            raise InputDataError(
                f"Matrix '{path}' has dtype {matrix.dtype}; expected numbers (int, float, bool)."
            )
        if matrix.ndim not in (2, 3):
            raise InputDataError(
                f"Matrix '{path}' has shape {matrix.shape}; expected features x cells "
                "(or features x cells x K for multinomial)."
            )
        self.matrix, self.path = matrix, path
        self.shape = tuple(int(d) for d in matrix.shape)
        self.feature_names, self.cell_ids = feature_names, cell_ids

    def _rows(self, start: int, stop: int) -> np.ndarray:
        rows = self.matrix[start:stop]
        if sp.issparse(rows):
            rows = rows.toarray()
        return np.asarray(rows, dtype=np.float32)


class DelimitedReader(MatrixReader):
    """CSV/TSV: first column = feature names, header row = cell ids; parsed in chunks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sep = DELIMITED[plain_suffix(path)]
        header = self._read(header=None, nrows=1, dtype=str, keep_default_na=False)
        self.cell_ids = header.to_numpy()[0, 1:].astype(str)
        # A feature named "NA" must stay a name: no NA parsing for the name column.
        names = self._read(usecols=[0], dtype=str, keep_default_na=False)
        self.feature_names = names.iloc[:, 0].to_numpy().astype(str)
        self.shape = (len(self.feature_names), len(self.cell_ids))

    def _read(self, **kwargs: Any) -> Any:
        """`pandas.read_csv` on this file, with parser errors turned into InputDataError."""
        try:
            return pd.read_csv(self.path, sep=self.sep, **kwargs)
        except (ValueError, pd.errors.ParserError) as err:
            raise InputDataError(f"Cannot parse '{self.path}' as a matrix: {err}") from None

    def iter_feature_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Parse `block_rows` lines at a time; never the whole file."""
        # An explicit dict: pandas 2.3 drops a defaultdict's entries after the first chunk.
        dtype: dict[int, Any] = {0: str} | {i: np.float32 for i in range(1, self.shape[1] + 1)}
        chunks = self._read(header=None, skiprows=1, index_col=0, chunksize=block_rows, dtype=dtype)
        start = 0
        with chunks:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                except (ValueError, pd.errors.ParserError) as err:
                    raise InputDataError(
                        f"Cannot parse '{self.path}' in data rows {start + 1}-"
                        f"{start + block_rows}: {err} (values must be numbers; "
                        "empty or NA for missing)"
                    ) from None
                if chunk.shape[1] != self.shape[1]:
                    raise InputDataError(
                        f"'{self.path}' rows {start + 1}-{start + len(chunk)} have "
                        f"{chunk.shape[1]} values but the header names {self.shape[1]} cells."
                    )
                yield start, chunk.to_numpy(dtype=np.float32)
                start += len(chunk)


def open_matrix(
    path: Path,
    *,
    features: NameSource = None,
    cells: NameSource = None,
    layer: str | None = None,
    modality: str | None = None,
) -> MatrixReader:
    """Open a matrix file; `features`/`cells` (files or lists) name .npy/.npz matrices;
    `layer` (X, raw or a layers/ name) and `modality` (MuData) select in AnnData files."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"Matrix '{path}' does not exist.")
    suffix = plain_suffix(path)
    if is_anndata_path(path):
        return open_anndata_matrix(path, modality=modality, layer=layer)
    if path.is_dir():
        return _open_mtx_folder(path)
    if suffix in DELIMITED:
        return _checked(DelimitedReader(path), feature_source=None, cell_source=None)
    if suffix in (".npy", ".npz"):
        return _open_unnamed(path, features=features, cells=cells)
    raise InputDataError(f"Unsupported matrix format '{path.name}'; expected {SUPPORTED}.")


def plain_suffix(path: Path) -> str:
    """The format suffix, ignoring a trailing `.gz` (`x.csv.gz` -> `.csv`)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _load_npz(path: Path) -> Any:
    """A scipy.sparse matrix saved with `save_npz`."""
    try:
        return sp.load_npz(path)
    except (ValueError, KeyError, OSError) as err:
        raise InputDataError(
            f"'{path}' is not a scipy.sparse .npz ({err}); save sparse matrices with "
            "scipy.sparse.save_npz, or dense ones with numpy.save as .npy."
        ) from None


def _open_unnamed(path: Path, *, features: NameSource, cells: NameSource) -> ArrayReader:
    """.npy (memory-mapped) or sparse .npz, named by separate lists."""
    if features is None or cells is None:
        raise InputDataError(
            f"'{path}' carries no names: give `features:` and `cells:` name files."
        )
    feature_names, feature_source = _names(features)
    cell_ids, cell_source = _names(cells)
    if path.suffix.lower() == ".npz":
        if is_streamable(path):  # CSR: streamed block by block, never loaded whole
            reader = StreamingCSRReader(path, feature_names=feature_names, cell_ids=cell_ids)
            return _checked(reader, feature_source=feature_source, cell_source=cell_source)
        matrix = _load_npz(path)
    else:
        try:
            matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise InputDataError(f"Cannot read '{path}' as a numeric .npy: {err}") from None
    reader = ArrayReader(matrix, path=path, feature_names=feature_names, cell_ids=cell_ids)
    return _checked(reader, feature_source=feature_source, cell_source=cell_source)


def _names(source: NameSource) -> tuple[np.ndarray, Path | None]:
    """Names from a text file (one per line) or a sequence, with the file for messages."""
    if isinstance(source, (str, Path)):
        return read_name_file(Path(source)), Path(source)
    return np.asarray(source).astype(str), None


def read_name_file(path: Path) -> np.ndarray:
    """One name per line; trailing blank lines are ignored, blank names are refused."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise InputDataError(f"Name file '{path}' has blank names on line(s) {blank[:5]}.")
    return np.asarray(lines, dtype=str)


def _checked(
    reader: MatrixReader, *, feature_source: Path | None, cell_source: Path | None
) -> MatrixReader:
    """Names must be as many as the matrix's rows (features) and columns (cells)."""
    checks = [
        ("Feature", reader.feature_names, reader.shape[0], "rows (features)", feature_source),
        ("Cell", reader.cell_ids, reader.shape[1], "columns (cells)", cell_source),
    ]
    for kind, names, expected, axis, source in checks:
        if len(names) != expected:
            origin = f"'{source}' lists" if source is not None else "the list has"
            raise InputDataError(
                f"{kind} names: {origin} {len(names)} names but matrix '{reader.path}' "
                f"has {expected} {axis} (shape {reader.shape}); one name per line, "
                "in matrix order."
            )
    return reader


def _find(folder: Path, *stems: str) -> Path | None:
    """The first of `stem` or `stem.gz` present in `folder`."""
    for stem in stems:
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _open_mtx_folder(folder: Path) -> ArrayReader:
    """10x folder: matrix.mtx (features x cells), features.tsv/genes.tsv, barcodes.tsv."""
    matrix = _find(folder, "matrix.mtx")
    features = _find(folder, "features.tsv", "genes.tsv")
    barcodes = _find(folder, "barcodes.tsv")
    missing = [
        n
        for n, p in [("matrix.mtx", matrix), ("features.tsv", features), ("barcodes.tsv", barcodes)]
        if p is None
    ]
    if missing:
        raise InputDataError(
            f"10x folder '{folder}' lacks {missing} (also looked for .gz and genes.tsv)."
        )
    table = pd.read_csv(features, sep="\t", header=None, dtype=str, keep_default_na=False)
    names = table.iloc[:, 1] if table.shape[1] > 1 else table.iloc[:, 0]
    if table.shape[1] > 1 and names.duplicated().any():
        logger.warning(
            "'%s': %d gene symbols are duplicated; using the feature ids (first column).",
            features,
            int(names.duplicated().sum()),
        )
        names = table.iloc[:, 0]
    cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str, keep_default_na=False)
    reader = ArrayReader(
        sp.csr_matrix(scipy.io.mmread(matrix)),
        path=folder,
        feature_names=names.to_numpy().astype(str),
        cell_ids=cells.iloc[:, 0].to_numpy().astype(str),
    )
    return _checked(reader, feature_source=features, cell_source=barcodes)
