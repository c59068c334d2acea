"""Technical groups: covariate combinations coded in sorted order, group 0 = baseline.

`baseline_group:` (the config) names the baseline by its label instead: that group gets
code 0 and the others keep their sorted order after it.
"""

from __future__ import annotations

import difflib
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
ALL = "all"  # the one group's label when there are no covariates
FIRST_SORTED = "first in sorted order"  # `baseline_rule` without `baseline_group:`
NAMED = "named by baseline_group"  # `baseline_rule` with it
SHOW = 20  # group labels listed in an error


@dataclass(frozen=True)
class GroupAssignment:
    """Per cell of the table: group code (-1 = dropped) and whether it is fit."""

    code: np.ndarray  # [N_table] int64
    fit: np.ndarray  # [N_table] bool
    labels: list[str]  # [C], covariate values joined by "|", in code order
    dropped: dict[str, int]  # groups without NTC cells -> number of cells dropped
    baseline_rule: str = FIRST_SORTED  # how labels[0], the baseline, was chosen

    @property
    def baseline(self) -> str:
        """The baseline group's label (code 0)."""
        return self.labels[0]


def assign_groups(
    covariates: pd.DataFrame,
    is_ntc: np.ndarray,
    *,
    use_all_cells: bool,
    policy: str = "drop",
    warn: bool = True,
    baseline: str | None = None,
) -> GroupAssignment:
    """`groupby(covariates).ngroup()` codes over the cells of groups that have NTC cells
    (`warn=False`: the dropped groups are not logged, for a pre-flight check).

    `baseline`: the label of the group to code 0 (the others keep their sorted order);
    None: the first in sorted order."""
    n_cells = len(is_ntc)
    is_ntc = np.asarray(is_ntc, dtype=bool)
    _refuse_missing(covariates)
    if covariates.shape[1] == 0:
        keys = pd.Series(np.zeros(n_cells, dtype=np.int64))
        labels_all = [ALL]
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
    if baseline is not None:
        kept_groups = _baseline_first(kept_groups, labels_all, baseline, dropped, covariates)
    recode = np.full(len(labels_all), NOT_FIT, dtype=np.int64)
    recode[kept_groups] = np.arange(len(kept_groups))
    code = recode[keys]
    fit = (code != NOT_FIT) & (np.ones(n_cells, bool) if use_all_cells else is_ntc)
    rule = FIRST_SORTED if baseline is None else NAMED
    return GroupAssignment(code, fit, [labels_all[g] for g in kept_groups], dropped, rule)


def _baseline_first(
    kept_groups: np.ndarray,
    labels_all: list[str],
    baseline: str,
    dropped: dict[str, int],
    covariates: pd.DataFrame,
) -> np.ndarray:
    """`kept_groups` (sorted codes) with the group labelled `baseline` moved to the front;
    a label that is no kept group is refused, saying which groups there are."""
    kept = [labels_all[g] for g in kept_groups]
    if baseline in kept:
        first = kept.index(baseline)
        return np.concatenate([kept_groups[first : first + 1], np.delete(kept_groups, first)])
    if baseline in dropped:
        raise InputDataError(
            f"baseline_group '{baseline}' has no NTC cells: its {dropped[baseline]} cell(s) "
            "are dropped (groups_without_ntc: drop), and a baseline needs NTC cells to fix "
            f"the others' effects against. Name a group that has NTC cells ({_listed(kept)}), "
            "or set baseline_group: null (the first in sorted order)."
        )
    near = _near(baseline, labels_all)
    hint = f" Did you mean '{near}'?" if near else ""
    without_ntc = f"; groups without NTC cells (dropped): {sorted(dropped)}" if dropped else ""
    raise InputDataError(
        f"baseline_group '{baseline}' is not a technical group; the groups are "
        f"{_listed(kept)}{without_ntc}. A group's label is its covariate values joined by "
        f"'{LABEL_SEP}' in the order of `covariates:` {list(covariates.columns)} ('{ALL}' "
        f"without covariates), matched exactly.{hint} Set baseline_group to one of them, "
        "or to null (the first in sorted order)."
    )


def _near(wanted: str, labels: list[str]) -> str | None:
    """The label `wanted` most likely meant: the same but for case or for the order of
    the covariate values, else a close spelling; None when none is close."""
    parts = sorted(wanted.casefold().split(LABEL_SEP))
    for label in labels:
        if sorted(label.casefold().split(LABEL_SEP)) == parts:
            return label
    close = difflib.get_close_matches(wanted, labels, n=1)
    return close[0] if close else None


def _listed(labels: list[str]) -> str:
    """The first SHOW labels, quoted, and how many there are in all."""
    shown = ", ".join(f"'{label}'" for label in labels[:SHOW])
    return shown + (f", … ({len(labels)} in all)" if len(labels) > SHOW else "")


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
    root: zarr.Group, *, use_all_cells: bool, policy: str, baseline: str | None = None
) -> GroupAssignment:
    """Read `inputs/cells`, assign groups (`baseline`: the label of group 0, None = the
    first in sorted order), write `prep/groups` (complete last)."""
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
    result = assign_groups(
        covariates, is_ntc, use_all_cells=use_all_cells, policy=policy, baseline=baseline
    )
    group = fresh_group(
        root,
        GROUPS,
        "bayesdream-groups",
        covariates=covariate_names,
        baseline_group=result.baseline,
        baseline_rule=result.baseline_rule,
    )
    write_array(group, "code", result.code, dims=(CELL,))
    write_array(group, "fit", result.fit, dims=(CELL,))
    write_strings(group, "labels", result.labels, dims=(GROUP,))
    write_coordinates(group, groups=result.labels)
    group.attrs["dropped"] = result.dropped
    mark_complete(group)
    logger.info(
        "%d technical groups: %s; baseline: %s (%s)",
        len(result.labels),
        ", ".join(result.labels),
        result.baseline,
        result.baseline_rule,
    )
    return result


def read_groups(root: zarr.Group) -> GroupAssignment:
    """The assignment written by `assign_groups_in_store` (labels in code order: the
    baseline first; stores written before `baseline_rule` existed used sorted order)."""
    group = root[GROUPS]
    return GroupAssignment(
        code=group["code"][...],
        fit=group["fit"][...],
        labels=list(read_strings(group, "labels")),
        dropped=dict(group.attrs.get("dropped", {})),
        baseline_rule=str(group.attrs.get("baseline_rule", FIRST_SORTED)),
    )
