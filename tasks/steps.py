"""The Prefect tasks: each is one step, thin (config -> call -> Zarr write -> small summary)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import zarr
from prefect import get_run_logger, task

from tasks import provenance
from tasks.config import RunConfig, apply_override, config_from_dict, load_config
from tasks.fitting import fit_modality
from tasks.groups import GroupAssignment, assign_groups_in_store, read_groups
from tasks.ingest import check_modality, ingest_modality, read_cells_table, write_cells
from tasks.ingest.matrix import ModalityPlan
from tasks.prepare import filter_features
from tasks.sampling import sample_modality
from tasks.store import (
    CIS_KEY,
    COMPLETE,
    fit_key,
    inputs_key,
    open_root,
    prep_key,
    results_key,
)


def resolve_config(config: str | Path | dict, overrides: list[str]) -> RunConfig:
    """A config path (with `--set` overrides) or an already-parsed mapping."""
    if isinstance(config, dict):
        for item in overrides:
            config = apply_override(dict(config), item)
        return config_from_dict(config, Path.cwd())
    return load_config(config, overrides)


@task(name="withdraw-completion")
def withdraw_completion(cfg: RunConfig, modalities: list[str]) -> bool:
    """An earlier run's store stops claiming to be complete before this run checks anything.

    Only the `complete` marks go (root, and the results this run rewrites): a run that
    fails, even in pre-flight, leaves no store that passes for the result of this config.
    Returns whether there was a store.
    """
    if not (Path(cfg.store) / "zarr.json").exists():
        return False
    root = open_root(cfg.store)
    keys = [results_key(name) for name in modalities]
    if _cis_rewritten(root, cfg, modalities):
        keys.append(CIS_KEY)
    for attrs in [root.attrs] + [root[key].attrs for key in keys if key in root]:
        if COMPLETE in attrs:
            del attrs[COMPLETE]
    return True


def _cis_rewritten(root: zarr.Group, cfg: RunConfig, modalities: list[str]) -> bool:
    """`technical/cis` exists and this run replaces it: one of its modalities names a cis
    feature, or it was left by an earlier run of one of them (which may no longer name one)."""
    return CIS_KEY in root and (
        root[CIS_KEY].attrs.get("modality") in modalities
        or any(cfg.modalities[n].cis_feature for n in modalities)
    )


@task(name="preflight")
def preflight(cfg: RunConfig, modalities: list[str]) -> dict[str, ModalityPlan]:
    """Every cheap check (cells table, matrix shapes and ids) before anything is written."""
    log = get_run_logger()
    table = read_cells_table(cfg)
    plans = {name: check_modality(cfg, name, table["cell"].to_numpy()) for name in modalities}
    log.info("Pre-flight passed: %d cells, modalities %s", len(table), ", ".join(plans))
    return plans


@task(name="create-store")
def create_store(cfg: RunConfig, modalities: list[str]) -> str:
    """Open (or create) the store; nothing in it claims to be finished until rewritten."""
    root = open_root(cfg.store, create=True)
    if COMPLETE in root.attrs:
        del root.attrs[COMPLETE]
    for name in modalities:
        for key in (inputs_key(name), prep_key(name), fit_key(name), results_key(name)):
            if key in root:
                del root[key]
    if _cis_rewritten(root, cfg, modalities):
        del root[CIS_KEY]
    root.attrs.update(
        {"config": json.loads(cfg.model_dump_json()), "provenance": provenance.describe()}
    )
    table = read_cells_table(cfg)
    write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    return str(cfg.store)


@task(name="ingest")
def ingest(cfg: RunConfig, name: str, plan: ModalityPlan) -> str:
    """Copy a modality's matrix into the store, chunked, in the cells table's order."""
    ingest_modality(open_root(cfg.store), cfg, name, plan, get_run_logger())
    return f"{cfg.store}/{inputs_key(name)}"


@task(name="assign-groups")
def assign_groups(cfg: RunConfig) -> list[str]:
    """Technical groups from the covariates; returns the labels in code order."""
    result = assign_groups_in_store(
        open_root(cfg.store), use_all_cells=cfg.use_all_cells, policy=cfg.groups_without_ntc
    )
    return result.labels


@task(name="filter-features")
def filter_step(cfg: RunConfig, name: str) -> dict[str, int]:
    """NTC filters; returns the number of features flagged by each reason."""
    flags = filter_features(open_root(cfg.store), name, _groups(cfg), get_run_logger())
    return {k: int(v.sum()) for k, v in flags.as_dict().items()}


def _groups(cfg: RunConfig) -> GroupAssignment:
    return read_groups(open_root(cfg.store))


@task(name="fit")
def fit(cfg: RunConfig, name: str) -> dict[str, Any]:
    """SVI fit of one modality."""
    return fit_modality(open_root(cfg.store), name, cfg.fit, get_run_logger())


@task(name="sample")
def sample(cfg: RunConfig, name: str) -> dict[str, Any]:
    """Posterior draws of one modality into its preallocated results."""
    return sample_modality(
        open_root(cfg.store),
        name,
        nsamples=cfg.fit.nsamples,
        seed=cfg.fit.seed,
        minibatch_size=cfg.fit.minibatch_size,
        device=cfg.fit.device,
        cis_feature=cfg.modalities[name].cis_feature,
        log=get_run_logger(),
    )


@task(name="finalize")
def finalize(cfg: RunConfig, started: float, summaries: dict[str, Any]) -> str:
    """Run-level provenance, then `complete: true` on the root, written last."""
    root = open_root(cfg.store)
    root.attrs.update(
        {
            "started": provenance.iso(started),
            "finished": provenance.iso(time.time()),
            "steps": summaries,
        }
    )
    root.attrs[COMPLETE] = True
    get_run_logger().info("Store complete: %s", cfg.store)
    return str(cfg.store)


__all__ = [
    "assign_groups",
    "create_store",
    "filter_step",
    "finalize",
    "fit",
    "ingest",
    "preflight",
    "resolve_config",
    "sample",
    "withdraw_completion",
]
