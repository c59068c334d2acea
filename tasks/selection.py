"""What a modality's fit reads, decided once, and its values read back from the store.

`select_fit` reads the selection (family, fit cells, features, group codes, size factors)
once; every reader of the fit matrix (the filters' blocks, the fit in memory or sparse or
streamed, sampling's plan) takes that selection instead of working any of it out again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import Family, get_family
from tasks.errors import InputDataError
from tasks.groups import GroupAssignment
from tasks.store import CELLS, FEATURE_CHUNK, inputs_key


@dataclass(frozen=True)
class FitSelection:
    """A modality's fit: its family, fit cells (columns of the store's matrix), fit
    features (rows), their group codes and size factors (when the family needs them)."""

    name: str
    family: Family
    groups: GroupAssignment
    cells: np.ndarray  # [N_fit] indices into the cells table
    features: np.ndarray  # [T_fit] indices into the modality's features
    sum_factor: np.ndarray | None  # [N_fit] float32

    @property
    def codes(self) -> np.ndarray:
        """Each fit cell's group code [N_fit]."""
        return self.groups.code[self.cells]

    @property
    def n_groups(self) -> int:
        return len(self.groups.labels)

    def entries_per_cell(self, matrix: zarr.Array) -> int:
        """Values a fit cell holds over the fit features (categories and denominator
        counted): what the memory plan multiplies by the cells."""
        per_cell = len(self.features) * int(np.prod(matrix.shape[2:], dtype=np.int64))
        return per_cell * (2 if self.family.spec.needs_denominator else 1)


def select_fit(
    root: zarr.Group, name: str, groups: GroupAssignment, features: np.ndarray | None = None
) -> FitSelection:
    """The selection, read once: `features` default to every feature of the modality."""
    group = root[inputs_key(name)]
    family = get_family(group.attrs["distribution"])
    cells = fit_cell_index(root, name, groups)
    if features is None:
        features = np.arange(group["counts"].shape[0])
    sum_factor = None
    if family.spec.needs_sum_factor:
        sum_factor = root[CELLS]["sum_factor"][...][cells].astype(np.float32)
    return FitSelection(name, family, groups, cells, np.asarray(features), sum_factor)


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


def read_selection(
    root: zarr.Group, selection: FitSelection, *, features: np.ndarray | None = None
) -> FitArrays:
    """The selection's values, dense (`features`: a subset of its features, e.g. a block)."""
    group = root[inputs_key(selection.name)]
    features = selection.features if features is None else np.asarray(features)
    cells = selection.cells
    denominator = None
    if selection.family.spec.needs_denominator:
        denominator = read_columns(group["denominator"], cells, features)
    return FitArrays(
        y=read_columns(group["counts"], cells, features),
        groups=selection.codes,
        n_groups=selection.n_groups,
        sum_factor=selection.sum_factor,
        denominator=denominator,
    )


def read_fit_arrays(
    root: zarr.Group,
    name: str,
    groups: GroupAssignment,
    *,
    features: np.ndarray | None = None,
) -> FitArrays:
    """The fit cells' counts (and size factors / denominator when the family needs them)."""
    return read_selection(root, select_fit(root, name, groups, features))
