"""What an AnnData (`.h5ad`, `.zarr`) or MuData (`.h5mu`) file holds, read without loading it.

An AnnData file (HDF5, or a Zarr folder) is a tree of elements: `X`, `layers/<name>`,
`raw/X` with its own `raw/var`, the `obs` and `var` dataframes (their `_index` attribute
names the column of cell ids / feature names). A MuData file holds one such tree per
modality under `mod/<name>`, beside a global `obs`. Here a file is opened read-only,
the element a config names (`modality:`, `layer:`) is found, and what is there is
listed when it is not. obs columns and indexes are read with anndata's own `read_elem`,
one column at a time, so a file's matrices are never touched.

This module reads no config and writes nothing: `tasks.config` validates with it,
`tasks.ingest` reads cells tables and matrices through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import zarr

from tasks.errors import InputDataError

ANNDATA_SUFFIXES = (".h5ad", ".h5mu", ".zarr")
X_LAYER = "X"  # `layer: X` (the default): the element's X
RAW_LAYER = "raw"  # `layer: raw`: raw/X, whose features are raw/var's
MODALITIES = "mod"

Node = Any  # an h5py.File/Group/Dataset or a zarr.Group/Array: both slice and index alike


def is_anndata_path(path: Path) -> bool:
    """True for `.h5ad`, `.h5mu` and `.zarr` paths (AnnData / MuData stores)."""
    return Path(path).suffix.lower() in ANNDATA_SUFFIXES


@contextmanager
def open_file(path: Path) -> Iterator[Node]:
    """The root of an AnnData/MuData file, read-only (h5py for HDF5, zarr for folders)."""
    path = Path(path)
    if path.is_dir():
        try:
            yield zarr.open_group(str(path), mode="r")
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise InputDataError(f"'{path}' is not an AnnData Zarr store: {err}") from None
        return
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise InputDataError(
            f"'{path}' is not an HDF5 file ({err}); write AnnData with `adata.write_h5ad` "
            "and MuData with `mdata.write`."
        ) from None
    with handle:
        yield handle


def is_group(node: Node) -> bool:
    """A group (dataframe, sparse matrix, AnnData) rather than an array."""
    return isinstance(node, (h5py.Group, zarr.Group))


def is_mudata(root: Node) -> bool:
    """MuData files hold their modalities under `mod/`."""
    return MODALITIES in root and is_group(root[MODALITIES])


def is_mudata_file(path: Path) -> bool:
    """True when the AnnData-format file at `path` is a MuData file (has `mod/`)."""
    with open_file(path) as root:
        return is_mudata(root)


def modality_names(root: Node) -> list[str]:
    """The modalities of a MuData file, sorted."""
    return sorted(root[MODALITIES].keys()) if is_mudata(root) else []


def element_key(root: Node, path: Path, modality: str | None, key: str = "modality") -> str:
    """Key of the AnnData element the config means: "" (the file) or `mod/<modality>`;
    `key` is the config key that named the modality, for messages."""
    names = modality_names(root)
    if not is_mudata(root):
        if modality is not None:
            raise InputDataError(
                f"'{path}' is an AnnData file, not MuData: it has no modalities, so "
                f"`{key}: {modality}` cannot be read from it (remove `{key}:`)."
            )
        return ""
    if modality is None:
        raise InputDataError(
            f"'{path}' is a MuData file with modalities {names}: say which one to read "
            "with `modality:` (`cells_modality:` for the cells table, or leave that out "
            "to use the global obs)."
        )
    if modality not in names:
        raise InputDataError(f"'{path}' has no modality '{modality}'; its modalities are {names}.")
    return f"{MODALITIES}/{modality}"


def available_layers(root: Node, element: str) -> list[str]:
    """What `layer:` may name in this element: X, raw (when raw/X exists), layers/<name>."""
    node = root[element] if element else root
    names = [X_LAYER] if X_LAYER in node else []
    if RAW_LAYER in node and is_group(node[RAW_LAYER]) and X_LAYER in node[RAW_LAYER]:
        names.append(RAW_LAYER)
    if "layers" in node and is_group(node["layers"]):
        names += sorted(node["layers"].keys())
    return names


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


@dataclass(frozen=True)
class Selection:
    """The matrix a config names in an AnnData/MuData file, and the tables naming its axes."""

    path: Path
    modality: str | None
    layer: str  # "X", "raw" or a name under layers/
    element: str  # "" or "mod/<modality>"

    @property
    def matrix_key(self) -> str:
        """X, raw/X or layers/<name>, inside the element (cells x features)."""
        if self.layer == X_LAYER:
            return _join(self.element, X_LAYER)
        if self.layer == RAW_LAYER:
            return _join(self.element, RAW_LAYER, X_LAYER)
        return _join(self.element, "layers", self.layer)

    @property
    def obs_key(self) -> str:
        """The cells of the matrix: the element's obs (raw shares it)."""
        return _join(self.element, "obs")

    @property
    def var_key(self) -> str:
        """The features of the matrix: raw/var for raw, else the element's var."""
        if self.layer == RAW_LAYER:
            return _join(self.element, RAW_LAYER, "var")
        return _join(self.element, "var")

    def describe(self) -> str:
        """ "'screen.h5mu' modality 'rna', layer 'counts'" for messages."""
        where = f"modality '{self.modality}', " if self.modality is not None else ""
        return f"'{self.path}' {where}layer '{self.layer}'"


def select(path: Path, root: Node, *, modality: str | None, layer: str | None) -> Selection:
    """The matrix `layer` (default X) of `modality` (MuData) in the open file `root`."""
    element = element_key(root, path, modality)
    layer = X_LAYER if layer is None else layer
    layers = available_layers(root, element)
    if layer not in layers:
        where = f" (modality '{modality}')" if modality is not None else ""
        raise InputDataError(
            f"'{path}'{where} has no layer '{layer}'; the layers it has: {layers} "
            f"(`layer: {X_LAYER}` is X, `layer: {RAW_LAYER}` is raw.X, any other name "
            "is one of `layers`)."
        )
    return Selection(Path(path), modality, layer, element)


def check_selection(path: Path, *, modality: str | None, layer: str | None) -> None:
    """Open the file and check that the modality and layer exist (InputDataError if not)."""
    with open_file(path) as root:
        select(path, root, modality=modality, layer=layer)


def check_obs_source(path: Path, *, modality: str | None) -> None:
    """The obs a cells table would be read from exists (InputDataError if not)."""
    with open_file(path) as root:
        if not is_mudata(root) or modality is not None:
            # a modality where there is none, or an unknown one
            element_key(root, path, modality, key="cells_modality")
        key = obs_key(root, path, modality)
        if key not in root:
            raise InputDataError(f"'{path}' has no '{key}' table.")


def obs_key(root: Node, path: Path, modality: str | None) -> str:
    """The cells table of a file: the (global) obs, or a MuData modality's."""
    if modality is None:
        return "obs"
    return _join(element_key(root, path, modality), "obs")


def dataframe_index(root: Node, key: str, path: Path) -> np.ndarray:
    """The index (obs_names / var_names) of the dataframe at `key`, as str."""
    if key not in root:
        raise InputDataError(f"'{path}' has no '{key}' table.")
    frame = root[key]
    if isinstance(frame, h5py.Dataset):  # very old h5ad: a compound dataset
        return _as_str(frame["index"])
    column = attr_str(frame.attrs.get("_index", "_index"))
    if column not in frame:
        raise InputDataError(f"'{path}': '{key}' has no index column '{column}'.")
    return _as_str(_read_elem(frame[column]))


def dataframe_columns(root: Node, key: str) -> list[str]:
    """The columns of the dataframe at `key`, in its order (the index not counted)."""
    order = root[key].attrs.get("column-order", [])
    if isinstance(order, str):  # one column: h5py gives a scalar
        order = [order]
    return [attr_str(c) for c in np.asarray(order, dtype=object).ravel()]


def read_columns(root: Node, key: str, columns: Sequence[str], path: Path) -> pd.DataFrame:
    """Those columns of the dataframe at `key` (categoricals as they are), indexed by ids."""
    frame = root[key]
    data = {column: _read_elem(frame[column]) for column in columns}
    return pd.DataFrame(data, index=pd.Index(dataframe_index(root, key, path)))


def _read_elem(node: Node) -> Any:
    """One element (array, categorical, nullable array) as anndata reads it."""
    from anndata.io import read_elem  # anndata's registry decodes every encoding

    return read_elem(node)


def attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _as_str(values: Any) -> np.ndarray:
    """Names as a numpy array of str (HDF5 strings may arrive as bytes)."""
    values = np.asarray(values, dtype=object).ravel()  # also numpy's StringDType
    if any(isinstance(v, bytes) for v in values[:1]):
        return np.asarray([attr_str(v) for v in values], dtype=str)
    return values.astype(str)
