"""The fit cells and their data, read back from the store: which cells a modality fits
(`fit_cell_index`) and their values, dense, a block of features at a time. Every step
that reads the fit matrix (filters, fit, sampling) reads it here."""

from __future__ import annotations

import numpy as np
import zarr

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from tasks.errors import InputDataError
from tasks.groups import GroupAssignment
from tasks.store import CELLS, FEATURE_CHUNK, inputs_key


def fit_cell_index(root: zarr.Group, name: str, groups: GroupAssignment) -> np.ndarray:
    """Columns (cells of the table) that are fit for this modality; every group needs some."""
    present = root[inputs_key(name)]["present"][...]
    index = np.flatnonzero(groups.fit & present)
    per_group = np.bincount(groups.code[index], minlength=len(groups.labels))
    missing = [groups.labels[g] for g in np.flatnonzero(per_group == 0)]
    if missing:
        raise InputDataError(
            f"Modality '{name}': technical groups {missing} have no fit cells in its matrix "
            f"(store key '{inputs_key(name)}/present'); add their NTC cells to the matrix."
        )
    return index


def read_columns(array: zarr.Array, cells: np.ndarray, features: np.ndarray) -> np.ndarray:
    """[N_fit, T_sel(, K)] float32 from a [T, N(, K)] array, one feature block at a time."""
    out = np.empty((len(cells), len(features), *array.shape[2:]), dtype=np.float32)
    for start in range(0, len(features), FEATURE_CHUNK):
        block = features[start : start + FEATURE_CHUNK]
        values = array.get_orthogonal_selection((block, cells))  # [t, n(, K)]
        out[:, start : start + len(block)] = np.swapaxes(values, 0, 1)
    return out


def read_fit_arrays(
    root: zarr.Group,
    name: str,
    groups: GroupAssignment,
    *,
    features: np.ndarray | None = None,
) -> FitArrays:
    """The fit cells' counts (and size factors / denominator when the family needs them)."""
    group = root[inputs_key(name)]
    family = get_family(group.attrs["distribution"])
    cells = fit_cell_index(root, name, groups)
    counts = group["counts"]
    features = np.arange(counts.shape[0]) if features is None else np.asarray(features)
    sum_factor = None
    if family.spec.needs_sum_factor:
        sum_factor = root[CELLS]["sum_factor"][...][cells].astype(np.float32)
    denominator = None
    if family.spec.needs_denominator:
        denominator = read_columns(group["denominator"], cells, features)
    return FitArrays(
        y=read_columns(counts, cells, features),
        groups=groups.code[cells],
        n_groups=len(groups.labels),
        sum_factor=sum_factor,
        denominator=denominator,
    )
