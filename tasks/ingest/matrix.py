"""Modality matrices: cheap pre-flight checks, then a block-by-block copy into the store.

`check_modality` opens the files and checks names, shapes and cell ids before any
store exists. `ingest_modality` then writes `inputs/<name>/counts` [T, N_table(, K)]
in the cells table's order (cells are matched by id, never by position; columns of
cells the matrix lacks are NaN), checking values one block of features at a time.
A failure deletes the modality's group: nothing half-written remains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from bayesdream_model.distributions import get_spec
from tasks.anndata_files import is_anndata_path
from tasks.config import ModalityConfig, RunConfig, denominator_modality
from tasks.errors import InputDataError
from tasks.ingest.readers import MatrixReader, open_matrix
from tasks.store import (
    CATEGORY,
    CELL,
    CELL_CHUNK,
    CELLS,
    FEATURE,
    FEATURE_CHUNK,
    fresh_group,
    inputs_key,
    mark_complete,
    read_strings,
    write_array,
    write_coordinates,
    write_strings,
)

logger = logging.getLogger(__name__)

SHOW = 5  # ids quoted in a message
NOT_COUNTS = (
    " Normalised or log-transformed values are not counts: give the raw counts (e.g. an "
    "AnnData `layer: counts`), or use a normal/studentt modality for continuous scores."
)


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class ModalityPlan:
    """What pre-flight learnt about a modality: names, shape and the cell matching."""

    name: str
    distribution: str
    shape: tuple[int, ...]  # of the matrix file: (T, N_matrix(, K))
    feature_names: np.ndarray  # [T]
    table_position: np.ndarray  # [N_matrix] int64: column of each matrix cell in the table
    present: np.ndarray  # [N_table] bool: table cells the matrix has

    @property
    def n_table_cells(self) -> int:
        """Columns of the stored matrix: one per row of the cells table."""
        return len(self.present)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of `inputs/<name>/counts`: [T, N_table(, K)]."""
        return (self.shape[0], self.n_table_cells, *self.shape[2:])


def check_modality(
    cfg: RunConfig, name: str, cell_table_ids: Sequence[str] | np.ndarray
) -> ModalityPlan:
    """Open a modality's files and check everything that needs no full pass over values."""
    mod = cfg.modalities[name]
    counts, denominator = open_modality(mod)
    _check_dims(counts, mod, name)
    _check_names(counts.feature_names, "feature names", counts.path)
    _check_names(counts.cell_ids, "cell ids", counts.path)
    if denominator is not None:
        _check_denominator(counts, denominator, name)
    if mod.cis_feature is not None and mod.cis_feature not in set(counts.feature_names):
        raise InputDataError(
            f"cis_feature '{mod.cis_feature}' of modality '{name}' is not among the "
            f"{counts.shape[0]} feature names of '{counts.path}' (first: "
            f"{_first_ids(counts.feature_names)}); check `modalities.{name}.cis_feature`."
        )
    table_position, present = _match_cells(counts, np.asarray(cell_table_ids).astype(str))
    return ModalityPlan(
        name=name,
        distribution=mod.distribution,
        shape=counts.shape,
        feature_names=counts.feature_names,
        table_position=table_position,
        present=present,
    )


def open_modality(mod: ModalityConfig) -> tuple[MatrixReader, MatrixReader | None]:
    """Readers for the counts and (binomial) the denominator, which may borrow names."""
    counts = open_matrix(
        mod.counts, features=mod.features, cells=mod.cells, layer=mod.layer, modality=mod.modality
    )
    if mod.denominator is None:
        return counts, None
    try:
        denominator = open_matrix(
            mod.denominator,
            features=mod.features if mod.features is not None else counts.feature_names,
            cells=mod.cells if mod.cells is not None else counts.cell_ids,
            layer=mod.denominator_layer,
            modality=denominator_modality(mod),
        )
    except InputDataError as err:  # its names are the counts': a count of them differs
        raise InputDataError(
            f"The denominator '{mod.denominator}' does not match the counts '{counts.path}' "
            f"(shape {counts.shape}); they must have exactly the same shape: {err}"
        ) from None
    return counts, denominator


def _check_dims(reader: MatrixReader, mod: ModalityConfig, name: str) -> None:
    """Multinomial is features x cells x K (K >= 2); every other distribution is 2-D; no
    axis is empty."""
    expected = 3 if get_spec(mod.distribution).is_3d else 2
    layout = "features x cells x K" if expected == 3 else "features x cells"
    where = f"Modality '{name}' ({mod.distribution}): '{reader.path}' has shape {reader.shape}"
    if len(reader.shape) != expected:
        raise InputDataError(f"{where}, expected {expected}-D ({layout}).")
    if min(reader.shape[:2]) == 0:
        raise InputDataError(f"{where}: it has no features or no cells ({layout}).")
    if expected == 3 and reader.shape[2] < 2:
        raise InputDataError(
            f"{where}: a multinomial needs K >= 2 categories on its last axis ({layout})."
        )


def _check_names(names: np.ndarray, what: str, path: Path) -> None:
    """Names are join keys: an empty name or a repeat would make a match ambiguous."""
    empty = np.flatnonzero(np.char.str_len(np.asarray(names, dtype=str)) == 0)
    if empty.size:
        raise InputDataError(
            f"'{path}' has {empty.size} empty {what} (first at position(s) "
            f"{empty[:SHOW].tolist()}, 0-based); every one must be a non-empty name."
        )
    index = pd.Index(names)
    if not index.is_unique:
        repeated = index[index.duplicated()].unique()
        hint = ""
        if is_anndata_path(path):
            fix = "var_names" if what == "feature names" else "obs_names"
            hint = f" (in AnnData: `adata.{fix}_make_unique()`)"
        raise InputDataError(
            f"'{path}' has {len(repeated)} duplicated {what} (first: "
            f"{_first_ids(repeated)}); {what} must be unique{hint}."
        )


def _check_denominator(counts: MatrixReader, denominator: MatrixReader, name: str) -> None:
    """The denominator must match the counts exactly: shape, features and cells, in order."""
    if denominator.shape != counts.shape:
        raise InputDataError(
            f"Binomial modality '{name}': denominator '{denominator.path}' has shape "
            f"{denominator.shape} but counts '{counts.path}' have shape {counts.shape}; "
            "they must have exactly the same shape."
        )
    for what, mine, theirs in [
        ("feature names", counts.feature_names, denominator.feature_names),
        ("cell ids", counts.cell_ids, denominator.cell_ids),
    ]:
        differ = np.flatnonzero(np.asarray(mine) != np.asarray(theirs))
        if differ.size:
            i = int(differ[0])
            raise InputDataError(
                f"Binomial modality '{name}': {what} of denominator '{denominator.path}' "
                f"differ from counts '{counts.path}' at position {i} "
                f"({str(theirs[i])!r} vs {str(mine[i])!r}); both must list them in the same order."
            )


def _match_cells(reader: MatrixReader, table_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column of each matrix cell in the cells table, and which table cells are present."""
    position = pd.Index(table_ids).get_indexer(reader.cell_ids)  # -1: not in the table
    unknown = reader.cell_ids[position < 0]
    if unknown.size:
        raise InputDataError(
            f"'{reader.path}' has {unknown.size} cell id(s) that are not in the cells table "
            f"(first: {_first_ids(unknown)}); every matrix cell needs a row in the table."
        )
    present = np.zeros(len(table_ids), dtype=bool)
    present[position] = True
    absent = int((~present).sum())
    if absent:
        logger.warning(
            "%d of %d cells in the cells table are absent from '%s' (first: %s); "
            "they are stored as missing (NaN) for this modality.",
            absent,
            len(table_ids),
            reader.path,
            _first_ids(table_ids[~present]),
        )
    return position.astype(np.int64), present


def check_values(
    cfg: RunConfig, plan: ModalityPlan, log: logging.Logger | logging.LoggerAdapter | None = None
) -> None:
    """A read-only pass over a modality's values (the checks ingestion makes), so that a
    bad value is refused before anything is written; one block of features at a time."""
    log = log if log is not None else logger
    readers = open_modality(cfg.modalities[plan.name])
    for start, y, n in _blocks(readers):
        _check_values(y, n, start=start, plan=plan, readers=readers)
        del y, n
    log.info("Modality '%s': values of %s checked.", plan.name, readers[0].path)


def _blocks(readers: tuple[MatrixReader, MatrixReader | None]):
    """(start, counts block, denominator block or None), FEATURE_CHUNK rows at a time."""
    counts, denominator = readers
    blocks = counts.iter_feature_blocks(FEATURE_CHUNK)
    if denominator is None:
        for start, y in blocks:
            yield start, y, None
            del y  # the block is released before the reader builds the next one
        return
    for (start, y), (_, n) in zip(
        blocks, denominator.iter_feature_blocks(FEATURE_CHUNK), strict=True
    ):
        yield start, y, n
        del y, n


def ingest_modality(
    root: zarr.Group,
    cfg: RunConfig,
    name: str,
    plan: ModalityPlan,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> zarr.Group:
    """Write `inputs/<name>/` block by block, checking values; mark it complete last."""
    log = log if log is not None else logger
    mod = cfg.modalities[name]
    counts, denominator = open_modality(mod)
    if counts.shape != plan.shape:
        raise InputDataError(
            f"'{counts.path}' changed since it was checked: shape {counts.shape}, "
            f"planned {plan.shape}. Run again."
        )
    key = inputs_key(name)
    group = fresh_group(
        root,
        key,
        "bayesdream-modality",
        distribution=mod.distribution,
        source=str(mod.counts),
        denominator_source=None if mod.denominator is None else str(mod.denominator),
        layer=mod.layer,
        source_modality=mod.modality,
        n_cells_present=int(plan.present.sum()),
    )
    try:
        _copy_blocks(group, plan, (counts, denominator), log)
        _write_names(root, group, plan)
        mark_complete(group)
    except BaseException:
        if key in root:
            del root[key]
        raise
    log.info("Modality '%s': ingested %s from '%s'.", name, plan.stored_shape, counts.path)
    return group


def _write_names(root: zarr.Group, group: zarr.Group, plan: ModalityPlan) -> None:
    """Feature names, which table cells are present, and the coordinates xarray reads."""
    write_strings(group, "feature_names", plan.feature_names, dims=(FEATURE,))
    write_array(group, "present", plan.present, dims=(CELL,))
    n_categories = plan.shape[2] if len(plan.shape) == 3 else None
    write_coordinates(group, features=plan.feature_names, n_categories=n_categories)
    if CELLS in root and CELL in root[CELLS]:  # the cells table's ids label the cell axis
        ids = read_strings(root[CELLS], CELL)
        if len(ids) == plan.n_table_cells:
            write_strings(group, CELL, ids, dims=(CELL,))


def _copy_blocks(
    group: zarr.Group,
    plan: ModalityPlan,
    readers: tuple[MatrixReader, MatrixReader | None],
    log: logging.Logger | logging.LoggerAdapter,
) -> None:
    """Copy FEATURE_CHUNK rows at a time (chunk-aligned), in cells-table column order."""
    targets = {"counts": _create(group, "counts", plan)}
    if readers[1] is not None:
        targets["denominator"] = _create(group, "denominator", plan)
    n_features = plan.shape[0]
    for start, y, n in _blocks(readers):
        _check_values(y, n, start=start, plan=plan, readers=readers)
        stop = start + len(y)
        targets["counts"][start:stop] = _table_order(y, plan)
        if n is not None:
            targets["denominator"][start:stop] = _table_order(n, plan)
        log.info(
            "Modality '%s': features %d-%d of %d written.", plan.name, start + 1, stop, n_features
        )
        del y, n  # release this block before the reader builds the next one


def _create(group: zarr.Group, name: str, plan: ModalityPlan) -> zarr.Array:
    """A NaN-filled float32 array chunked (features, cells(, K))."""
    chunks = (FEATURE_CHUNK, CELL_CHUNK, *plan.shape[2:])
    dims = (FEATURE, CELL, CATEGORY)[: len(plan.stored_shape)]
    return group.create_array(
        name,
        shape=plan.stored_shape,
        chunks=chunks,
        dtype="float32",
        fill_value=np.nan,
        dimension_names=dims,
    )


def _table_order(block: np.ndarray, plan: ModalityPlan) -> np.ndarray:
    """Scatter matrix columns to their cells-table columns; absent cells stay NaN."""
    n_table = plan.n_table_cells
    if len(plan.table_position) == n_table and np.array_equal(
        plan.table_position, np.arange(n_table)
    ):
        return block
    out = np.full((block.shape[0], n_table, *block.shape[2:]), np.nan, dtype=np.float32)
    out[:, plan.table_position] = block
    return out


def _check_values(
    y: np.ndarray,
    n: np.ndarray | None,
    *,
    start: int,
    plan: ModalityPlan,
    readers: tuple[MatrixReader, MatrixReader | None],
) -> None:
    """Counts (and denominators) >= 0 and finite; binomial counts <= denominators."""
    if not get_spec(plan.distribution).count_data:
        return  # normal / studentt: NaN and Inf are missing values
    for values, reader in [(y, readers[0]), (n, readers[1])]:
        if values is None or reader is None:
            continue
        for bad, need, hint in [
            (~np.isfinite(values) | (values < 0), "finite, non-negative counts", ""),
            (values != np.round(values), "whole counts", NOT_COUNTS),
        ]:
            if bad.any():
                where, value = _first(bad, values, start, plan, reader)
                raise InputDataError(
                    f"'{reader.path}': {plan.distribution} modality '{plan.name}' needs "
                    f"{need}, but {where} is {value} ({int(bad.sum())} such value(s) among "
                    f"features {start + 1}-{start + len(values)}).{hint}"
                )
    if n is not None:
        bad = y > n
        if bad.any():
            where, value = _first(bad, y, start, plan, readers[0])
            _, total = _first(bad, n, start, plan, readers[0])
            raise InputDataError(
                f"'{readers[0].path}': binomial modality '{plan.name}' has counts above their "
                f"denominator ('{readers[1].path}'): {where} is {value} > {total} "
                f"({int(bad.sum())} such value(s) among features {start + 1}-"
                f"{start + len(y)})."
            )


def _first(
    bad: np.ndarray, values: np.ndarray, start: int, plan: ModalityPlan, reader: MatrixReader
) -> tuple[str, float]:
    """Describe the first flagged entry: "feature 'X' in cell 'c7' (category 2)"."""
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = (
        f"feature '{plan.feature_names[start + index[0]]}' in cell '{reader.cell_ids[index[1]]}'"
    )
    if len(index) == 3:
        where += f" (category {index[2]})"
    return where, values[index].item()


def _first_ids(values: Sequence[str] | np.ndarray) -> list[str]:
    """The first few ids as plain strings, for messages."""
    return [str(v) for v in list(values)[:SHOW]]
