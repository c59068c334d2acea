"""Pre-flight: every check of a run's inputs, made before anything is written anywhere.

What a user loses to a bad input is nothing: an earlier run's store at the same path is
left exactly as it was. So the store's location, the cells table, the technical groups,
every modality's names, shapes, cell matching and values are checked here, read-only, and
so is the free space of the store's disk against the results' size; only then does the
run withdraw completion marks and write. Values are read in one pass of blocks (the
checks ingestion makes again while copying), except for a modality whose ingested copy
in the store is complete and of the same file content: that copy was checked when it was
written, and ingestion will be skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from tasks.config import RunConfig
from tasks.errors import InputDataError
from tasks.filesystem import check_free_space, results_bytes, size, still_to_write
from tasks.fingerprint import Fingerprints, fingerprints
from tasks.groups import NTC, GroupAssignment, assign_groups
from tasks.ingest import check_modality, read_cells_table
from tasks.ingest.matrix import ModalityPlan, check_values
from tasks.store import check_store_location, inputs_key, is_unchanged, results_key

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
    check_space(cfg, plans, n_groups=len(groups.labels), prints=prints, stored=stored)
    return prints, plans


def check_space(
    cfg: RunConfig,
    plans: dict[str, ModalityPlan],
    *,
    n_groups: int,
    prints: Fingerprints,
    stored: zarr.Group | None,
) -> None:
    """The results this run will write fit the free space of the store's disk: they are
    preallocated at full size, so a run that would fill the disk mid-sampling (after a fit
    of hours) is refused now. Results kept from an earlier run need nothing."""
    pending, shapes = 0, []
    for name, plan in plans.items():
        if stored is not None and is_unchanged(stored, results_key(name), prints.sample[name]):
            continue
        planned = results_bytes(
            plan.distribution,
            n_samples=cfg.fit.nsamples,
            n_groups=n_groups,
            matrix_shape=plan.shape,
        )
        pending += still_to_write(cfg.store, name, planned)
        categories = f" x {plan.shape[2]} categories" if len(plan.shape) > 2 else ""
        shapes.append(
            f"'{name}': {cfg.fit.nsamples} draws x {n_groups} groups x {plan.shape[0]} "
            f"features{categories}, {size(planned)}"
        )
    check_free_space(Path(cfg.store), pending, "; ".join(shapes))


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
