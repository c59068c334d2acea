"""The cells table: read, validate before any store is written, and store it.

One row per cell: `cell` (id), `target` (`ntc` = non-targeting control), each
covariate, and the size-factor column (needed when a modality is negbinom).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from bayesdream_model.distributions import requires_sum_factor
from tasks.config import RunConfig
from tasks.errors import InputDataError
from tasks.ingest.readers import plain_suffix
from tasks.store import CELL, CELLS, fresh_group, mark_complete, write_array, write_strings

logger = logging.getLogger(__name__)

CELL_COLUMN = "cell"
TARGET_COLUMN = "target"
SHOW = 5  # offending ids quoted in a message


def read_cells_table(cfg: RunConfig) -> pd.DataFrame:
    """Read `cfg.cells` (CSV/TSV) and refuse anything the fit cannot use."""
    path = cfg.cells
    needs_sf = any(requires_sum_factor(m.distribution) for m in cfg.modalities.values())
    text_columns = [CELL_COLUMN, TARGET_COLUMN, *cfg.covariates]
    required = text_columns + ([cfg.sum_factor_col] if needs_sf else [])
    sep = "\t" if plain_suffix(path) in (".tsv", ".txt") else ","
    try:
        header = pd.read_csv(path, sep=sep, nrows=0)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputDataError(f"Cannot parse cells table '{path}': {err}") from None
    _require_columns(path, list(header.columns), required, cfg.sum_factor_col)
    try:
        table = pd.read_csv(path, sep=sep, dtype={c: str for c in text_columns})
    except (ValueError, pd.errors.ParserError) as err:
        raise InputDataError(f"Cannot parse cells table '{path}': {err}") from None
    if table.empty:
        raise InputDataError(f"Cells table '{path}' has no rows.")
    _check_missing(path, table, text_columns)
    _check_unique_ids(path, table)
    if cfg.sum_factor_col in table.columns:
        table[cfg.sum_factor_col] = pd.to_numeric(table[cfg.sum_factor_col], errors="coerce")
        if needs_sf:
            _check_size_factors(path, table, cfg.sum_factor_col)
    logger.info("Cells table '%s': %d cells, %d NTC.", path, len(table), _ntc_count(table))
    return table.reset_index(drop=True)


def _require_columns(
    path: Path, available: list[str], required: Sequence[str], sum_factor_col: str
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
        f"Cells table '{path}' is missing column(s) {missing}; available columns: "
        f"{available}." + (f" Hint: {'; '.join(hints)}." if hints else "")
    )


def _check_missing(path: Path, table: pd.DataFrame, columns: Sequence[str]) -> None:
    """A missing id, target or covariate must not silently become a value or a group."""
    problems = []
    for column in columns:
        empty = table[column].isna().to_numpy()
        if empty.any():
            rows = (np.flatnonzero(empty)[:SHOW] + 2).tolist()  # +2: header, 1-based
            problems.append(
                f"column '{column}' has missing values in {int(empty.sum())} "
                f"cell(s) (first at line(s) {rows})"
            )
    if problems:
        raise InputDataError(
            f"Cells table '{path}': {'; '.join(problems)}. A missing covariate would become "
            "its own technical group: fill the values or drop those cells."
        )


def _check_unique_ids(path: Path, table: pd.DataFrame) -> None:
    """Cell ids are the join key with every matrix: they must be unique."""
    repeated = table[CELL_COLUMN][table[CELL_COLUMN].duplicated()].unique()
    if len(repeated):
        raise InputDataError(
            f"Cells table '{path}' has {len(repeated)} duplicated cell id(s) in column "
            f"'{CELL_COLUMN}' (first: {_first_ids(repeated)}); cell ids must be unique."
        )


def _check_size_factors(path: Path, table: pd.DataFrame, column: str) -> None:
    """negbinom scales its mean by the size factor: it must be finite and > 0."""
    values = table[column].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        first = _first_ids(table[CELL_COLUMN].to_numpy()[bad])
        raise InputDataError(
            f"Cells table '{path}': size-factor column '{column}' must be finite and > 0 "
            f"for negbinom modalities, but {int(bad.sum())} cell(s) are not (non-numeric, "
            f"missing, zero or negative; first: {first})."
        )


def _ntc_count(table: pd.DataFrame) -> int:
    """Number of non-targeting control cells."""
    return int((table[TARGET_COLUMN] == "ntc").sum())


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
