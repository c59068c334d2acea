"""The cells table: read, validate before any store is written, and store it.

One row per cell: `cell` (id), `target` (`ntc` = non-targeting control), each
covariate, and the size-factor column (needed when a modality is negbinom). From a CSV/TSV
with a header, or the obs of an AnnData/MuData file, whose index is the cell id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from bayesdream_model.distributions import requires_sum_factor
from tasks.anndata_files import (
    dataframe_columns,
    is_anndata_path,
    obs_key,
    open_file,
    read_columns,
)
from tasks.config import RunConfig
from tasks.errors import InputDataError
from tasks.groups import NTC
from tasks.ingest.readers import plain_suffix
from tasks.store import CELL, CELLS, fresh_group, mark_complete, write_array, write_strings

logger = logging.getLogger(__name__)

CELL_COLUMN = "cell"
TARGET_COLUMN = "target"
SHOW = 5  # offending ids quoted in a message


def read_cells_table(cfg: RunConfig) -> pd.DataFrame:
    """Read `cfg.cells` (CSV/TSV, or the obs of an AnnData/MuData file) and refuse anything
    the fit cannot use."""
    needs_sf = any(requires_sum_factor(m.distribution) for m in cfg.modalities.values())
    text_columns = [CELL_COLUMN, TARGET_COLUMN, *cfg.covariates]
    columns = _Columns(text_columns, needs_sf, cfg.sum_factor_col)
    if is_anndata_path(cfg.cells):
        table, source = _read_obs(cfg.cells, cfg.cells_modality, columns)
    else:
        table, source = _read_delimited(cfg.cells, columns)
    if table.empty:
        raise InputDataError(f"Cells table {source.label} has no rows.")
    _check_missing(source, table, text_columns)
    _check_unique_ids(source.label, table)
    _check_ntc(source.label, table)
    if cfg.sum_factor_col in table.columns:
        table[cfg.sum_factor_col] = pd.to_numeric(table[cfg.sum_factor_col], errors="coerce")
        if needs_sf:
            _check_size_factors(source.label, table, cfg.sum_factor_col)
    logger.info("Cells table %s: %d cells, %d NTC.", source.label, len(table), _ntc_count(table))
    return table.reset_index(drop=True)


@dataclass(frozen=True)
class _Columns:
    """The columns a cells table must have: ids, target and covariates as text, and the
    size factor when a modality is negbinom."""

    text: list[str]
    needs_sum_factor: bool
    sum_factor_col: str

    @property
    def required(self) -> list[str]:
        return self.text + ([self.sum_factor_col] if self.needs_sum_factor else [])


@dataclass(frozen=True)
class _Source:
    """Where the table came from, for messages: its label and how rows are named."""

    label: str  # "'cells.csv'" or "'screen.h5mu' (obs of modality 'rna')"
    row_kind: str  # "line" (CSV: 1-based, header counted) or "cell" (obs: the cell id)


def _read_delimited(path: Path, columns: _Columns) -> tuple[pd.DataFrame, _Source]:
    """A CSV/TSV with a header row."""
    sep = "\t" if plain_suffix(path) in (".tsv", ".txt") else ","
    label = f"'{path}'"
    try:
        header = pd.read_csv(path, sep=sep, nrows=0)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputDataError(f"Cannot parse cells table '{path}': {err}") from None
    _require_columns(label, list(header.columns), columns.required, columns.sum_factor_col)
    try:
        table = pd.read_csv(path, sep=sep, dtype={c: str for c in columns.text})
    except (ValueError, pd.errors.ParserError) as err:
        raise InputDataError(f"Cannot parse cells table '{path}': {err}") from None
    return table, _Source(label, "line")


def _read_obs(path: Path, modality: str | None, columns: _Columns) -> tuple[pd.DataFrame, _Source]:
    """The obs of an AnnData file (or a MuData file's global / a modality's obs): its index
    is the cell id; only the columns the fit needs are read."""
    with open_file(path) as root:
        key = obs_key(root, path, modality)
        where = f"obs of modality '{modality}'" if modality is not None else "obs"
        label = f"'{path}' ({where})"
        available = dataframe_columns(root, key)
        wanted = [c for c in columns.required if c != CELL_COLUMN]
        _require_columns(label, [CELL_COLUMN, *available], wanted, columns.sum_factor_col)
        if columns.sum_factor_col in available and columns.sum_factor_col not in wanted:
            wanted.append(columns.sum_factor_col)
        extra = [CELL_COLUMN] if CELL_COLUMN in available else []
        obs = read_columns(root, key, wanted + extra, path)
    ids = np.asarray(obs.index, dtype=str)
    if extra and not np.array_equal(ids, _as_text(obs[CELL_COLUMN]).to_numpy().astype(str)):
        raise InputDataError(
            f"Cells table {label} has a column '{CELL_COLUMN}' that differs from its index "
            "(obs_names); the index is the cell id: drop or rename that column."
        )
    table = pd.DataFrame({CELL_COLUMN: ids})
    for column in wanted:
        values = obs[column]
        text = column in columns.text
        table[column] = (_as_text(values) if text else values).to_numpy()
    return table, _Source(label, "cell")


def _as_text(values: pd.Series) -> pd.Series:
    """Values (categorical, numbers, strings) as str, with missing values kept missing."""
    text = values.astype(object)
    missing = text.isna().to_numpy()
    text = text.astype(str)
    text[missing] = np.nan
    return text.reset_index(drop=True)


def _require_columns(
    label: str, available: list[str], required: Sequence[str], sum_factor_col: str
) -> None:
    """Every required column must be present; name the missing ones and what is there."""
    missing = [c for c in required if c not in available]
    if not missing:
        return
    hints = []
    if sum_factor_col in missing:
        hints.append(
            f"negbinom modalities need size factors in '{sum_factor_col}' "
            "(set `sum_factor_col:` to use another column)"
        )
    if set(missing) - {CELL_COLUMN, TARGET_COLUMN, sum_factor_col}:
        hints.append("check `covariates:` in the config")
    raise InputDataError(
        f"Cells table {label} is missing column(s) {missing}; available columns: "
        f"{available}." + (f" Hint: {'; '.join(hints)}." if hints else "")
    )


def _check_missing(source: _Source, table: pd.DataFrame, columns: Sequence[str]) -> None:
    """A missing id, target or covariate must not silently become a value or a group."""
    problems = []
    for column in columns:
        empty = table[column].isna().to_numpy()
        if empty.any():
            rows = np.flatnonzero(empty)[:SHOW]
            if source.row_kind == "line":
                first = f"first at line(s) {(rows + 2).tolist()}"  # +2: header, 1-based
            else:
                first = f"first in cell(s) {_first_ids(table[CELL_COLUMN].to_numpy()[rows])}"
            problems.append(
                f"column '{column}' has missing values in {int(empty.sum())} cell(s) ({first})"
            )
    if problems:
        raise InputDataError(
            f"Cells table {source.label}: {'; '.join(problems)}. A missing covariate would "
            "become its own technical group: fill the values or drop those cells."
        )


def _check_unique_ids(label: str, table: pd.DataFrame) -> None:
    """Cell ids are the join key with every matrix: they must be unique."""
    repeated = table[CELL_COLUMN][table[CELL_COLUMN].duplicated()].unique()
    if len(repeated):
        raise InputDataError(
            f"Cells table {label} has {len(repeated)} duplicated cell id(s) in column "
            f"'{CELL_COLUMN}' (first: {_first_ids(repeated)}); cell ids must be unique."
        )


def _check_ntc(label: str, table: pd.DataFrame) -> None:
    """Technical effects are learnt from NTC cells (every group needs some, even with
    use_all_cells): a table without any is refused, with what the column does hold."""
    targets = table[TARGET_COLUMN]
    if (targets == NTC).any():
        return
    common = ", ".join(f"'{v}' ({n})" for v, n in targets.value_counts().head(SHOW).items())
    near = sorted({v for v in targets.unique() if v.strip().lower() == NTC})
    hint = (
        f" Did you mean {near}? The marker is exactly '{NTC}' (lowercase)."
        if near
        else f" Mark the non-targeting controls with target '{NTC}'."
    )
    raise InputDataError(
        f"Cells table {label} has no NTC cells: no row of column '{TARGET_COLUMN}' is "
        f"'{NTC}' (most common values: {common}). The technical fit learns from "
        f"non-targeting-control cells.{hint}"
    )


def _check_size_factors(label: str, table: pd.DataFrame, column: str) -> None:
    """negbinom scales its mean by the size factor: it must be finite and > 0."""
    values = table[column].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        first = _first_ids(table[CELL_COLUMN].to_numpy()[bad])
        raise InputDataError(
            f"Cells table {label}: size-factor column '{column}' must be finite and > 0 "
            f"for negbinom modalities, but {int(bad.sum())} cell(s) are not (non-numeric, "
            f"missing, zero or negative; first: {first})."
        )


def _ntc_count(table: pd.DataFrame) -> int:
    """Number of non-targeting control cells."""
    return int((table[TARGET_COLUMN] == NTC).sum())


def write_cells(
    root: zarr.Group, table: pd.DataFrame, covariates: Sequence[str], sum_factor_col: str
) -> zarr.Group:
    """Write `inputs/cells/` (cell, target, sum_factor, covariates/<col>) and mark it complete."""
    group = fresh_group(
        root, CELLS, "bayesdream-cells", covariates=list(covariates), sum_factor_col=sum_factor_col
    )
    write_strings(group, CELL_COLUMN, table[CELL_COLUMN].to_numpy(), dims=(CELL,))
    write_strings(group, TARGET_COLUMN, table[TARGET_COLUMN].to_numpy(), dims=(CELL,))
    if sum_factor_col in table.columns:
        sum_factor = table[sum_factor_col].to_numpy(dtype=np.float64)
    else:
        sum_factor = np.full(len(table), np.nan)
    write_array(group, "sum_factor", sum_factor, dims=(CELL,))
    covariate_group = group.require_group("covariates")
    for column in covariates:
        write_strings(covariate_group, column, table[column].to_numpy(), dims=(CELL,))
    mark_complete(group)
    logger.info("Wrote %d cells to '%s'.", len(table), CELLS)
    return group


def _first_ids(values: Sequence[str] | np.ndarray) -> list[str]:
    """The first few ids as plain strings, for messages."""
    return [str(v) for v in list(values)[:SHOW]]
