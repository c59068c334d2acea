"""Pre-flight: every check of a run's inputs, made before anything is written anywhere.

What a user loses to a bad input is nothing: an earlier run's store at the same path is
left exactly as it was. So the store's location, the cells table, the technical groups,
every modality's names, shapes, cell matching and values are checked here, read-only,
and only then does the run withdraw completion marks and write. Values are read in one
pass of blocks (the checks ingestion makes again while copying), except for a modality
whose ingested copy in the store is complete and of the same file content: that copy
was checked when it was written, and ingestion will be skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from tasks.config import RunConfig
from tasks.errors import InputDataError
from tasks.fingerprint import Fingerprints, fingerprints
from tasks.groups import NTC, GroupAssignment, assign_groups
from tasks.ingest import check_modality, read_cells_table
from tasks.ingest.matrix import ModalityPlan, check_values
from tasks.store import check_store_location, inputs_key, is_unchanged

SHOW = 5


def check_run(
    cfg: RunConfig, names: list[str], log: logging.Logger | logging.LoggerAdapter
) -> tuple[Fingerprints, dict[str, ModalityPlan]]:
    """Every step's fingerprint and every modality's plan, or the first problem found."""
    check_store_location(Path(cfg.store))
    table = read_cells_table(cfg)
    groups = table_groups(cfg, table)
    prints = fingerprints(cfg)
    stored = _existing_store(Path(cfg.store))
    plans = {}
    for name in names:
        plan = check_modality(cfg, name, table["cell"].to_numpy())
        check_fit_cells(cfg, plan, groups)
        if stored is None or not is_unchanged(stored, inputs_key(name), prints.ingest[name]):
            check_values(cfg, plan, log)
        plans[name] = plan
    return prints, plans


def table_groups(cfg: RunConfig, table: pd.DataFrame) -> GroupAssignment:
    """The technical groups the run will assign (the refusals of `assign_groups` now,
    a `baseline_group` that names no group with NTC cells among them)."""
    covariates = table[list(cfg.covariates)].astype(str)
    is_ntc = (table["target"] == NTC).to_numpy()
    return assign_groups(
        covariates,
        is_ntc,
        use_all_cells=cfg.use_all_cells,
        policy=cfg.groups_without_ntc,
        warn=False,
        baseline=cfg.baseline_group,
    )


def check_fit_cells(cfg: RunConfig, plan: ModalityPlan, groups: GroupAssignment) -> None:
    """Every technical group needs fit cells (NTC cells, or all with use_all_cells) that
    the modality's matrix has: a group's effect cannot be learnt from no cells."""
    fit = groups.fit & plan.present
    per_group = np.bincount(groups.code[fit], minlength=len(groups.labels))
    empty = [groups.labels[g] for g in np.flatnonzero(per_group == 0)]
    if not empty:
        return
    source = cfg.modalities[plan.name].counts
    what = "cells" if cfg.use_all_cells else "NTC cells"
    raise InputDataError(
        f"Modality '{plan.name}': '{source}' has no {what} of technical group(s) "
        f"{empty[:SHOW]} (the cells table has them, the matrix does not); every group "
        f"needs fit cells in every modality. Add those cells' columns to the matrix, or "
        "leave the groups' cells out of the cells table."
    )


def _existing_store(path: Path) -> zarr.Group | None:
    """The earlier run's store, read-only, when there is one (already checked as ours)."""
    if not (path / "zarr.json").exists():
        return None
    return zarr.open_group(str(path), mode="r")
