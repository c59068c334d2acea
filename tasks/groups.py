"""Technical groups: covariate combinations coded in sorted order, group 0 = baseline."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import zarr

from tasks.errors import InputDataError
from tasks.store import (
    CELL,
    CELLS,
    GROUP,
    GROUPS,
    fresh_group,
    mark_complete,
    read_strings,
    write_array,
    write_coordinates,
    write_strings,
)

logger = logging.getLogger(__name__)

NTC = "ntc"
LABEL_SEP = "|"
NOT_FIT = -1


@dataclass(frozen=True)
class GroupAssignment:
    """Per cell of the table: group code (-1 = dropped) and whether it is fit."""

    code: np.ndarray  # [N_table] int64
    fit: np.ndarray  # [N_table] bool
    labels: list[str]  # [C], covariate values joined by "|", in code order
    dropped: dict[str, int]  # groups without NTC cells -> number of cells dropped


def assign_groups(
    covariates: pd.DataFrame,
    is_ntc: np.ndarray,
    *,
    use_all_cells: bool,
    policy: str = "drop",
    warn: bool = True,
) -> GroupAssignment:
    """`groupby(covariates).ngroup()` codes over the cells of groups that have NTC cells
    (`warn=False`: the dropped groups are not logged, for a pre-flight check)."""
    n_cells = len(is_ntc)
    is_ntc = np.asarray(is_ntc, dtype=bool)
    _refuse_missing(covariates)
    if covariates.shape[1] == 0:
        keys = pd.Series(np.zeros(n_cells, dtype=np.int64))
        labels_all = ["all"]
    else:
        keys = covariates.groupby(list(covariates.columns), sort=True).ngroup()
        labels_all = _labels(covariates, keys)
    keys = keys.to_numpy()
    ntc_per_group = np.bincount(keys[is_ntc], minlength=len(labels_all))
    empty = np.flatnonzero(ntc_per_group == 0)
    dropped = {labels_all[g]: int((keys == g).sum()) for g in empty}
    if dropped and policy == "error":
        raise InputDataError(
            f"Technical groups without NTC cells: {dropped} (group: cells). Every group needs "
            "NTC cells to learn its effect; remove those cells or set groups_without_ntc: drop."
        )
    if dropped and warn:
        logger.warning(
            "Dropping %d cells of technical groups without NTC cells: %s",
            sum(dropped.values()),
            ", ".join(f"{k} ({v} cells)" for k, v in dropped.items()),
        )
    kept_groups = np.setdiff1d(np.arange(len(labels_all)), empty)
    recode = np.full(len(labels_all), NOT_FIT, dtype=np.int64)
    recode[kept_groups] = np.arange(len(kept_groups))
    code = recode[keys]
    fit = (code != NOT_FIT) & (np.ones(n_cells, bool) if use_all_cells else is_ntc)
    return GroupAssignment(code, fit, [labels_all[g] for g in kept_groups], dropped)


def _refuse_missing(covariates: pd.DataFrame) -> None:
    """pandas' groupby would code a missing value -1 (no group): refuse it, counted."""
    missing = covariates.isna().sum()
    missing = missing[missing > 0]
    if len(missing):
        counts = ", ".join(f"'{column}': {int(n)} cell(s)" for column, n in missing.items())
        raise InputDataError(
            f"Covariates have missing values ({counts}); a missing covariate must not become "
            "a technical group of its own: fill the values or drop those cells."
        )


def _labels(covariates: pd.DataFrame, keys: pd.Series) -> list[str]:
    """Covariate values joined by '|', in code order."""
    first = covariates.assign(_code=keys.to_numpy()).drop_duplicates("_code").sort_values("_code")
    return [
        LABEL_SEP.join(str(v) for v in row)
        for row in first[list(covariates.columns)].itertuples(index=False)
    ]


def assign_groups_in_store(
    root: zarr.Group, *, use_all_cells: bool, policy: str
) -> GroupAssignment:
    """Read `inputs/cells`, assign groups, write `prep/groups` (complete last)."""
    cells = root[CELLS]
    covariate_names = list(cells.attrs.get("covariates", []))
    covariates = pd.DataFrame(
        {c: read_strings(cells["covariates"], c) for c in covariate_names}, dtype=str
    )
    is_ntc = read_strings(cells, "target") == NTC
    if use_all_cells:
        logger.warning(
            "use_all_cells: fitting technical effects on ALL cells; this is only valid when "
            "technical effects are independent of the perturbations."
        )
    result = assign_groups(covariates, is_ntc, use_all_cells=use_all_cells, policy=policy)
    group = fresh_group(root, GROUPS, "bayesdream-groups", covariates=covariate_names)
    write_array(group, "code", result.code, dims=(CELL,))
    write_array(group, "fit", result.fit, dims=(CELL,))
    write_strings(group, "labels", result.labels, dims=(GROUP,))
    write_coordinates(group, groups=result.labels)
    group.attrs["dropped"] = result.dropped
    mark_complete(group)
    logger.info("%d technical groups: %s", len(result.labels), ", ".join(result.labels))
    return result


def read_groups(root: zarr.Group) -> GroupAssignment:
    """The assignment written by `assign_groups_in_store`."""
    group = root[GROUPS]
    return GroupAssignment(
        code=group["code"][...],
        fit=group["fit"][...],
        labels=list(read_strings(group, "labels")),
        dropped=dict(group.attrs.get("dropped", {})),
    )
