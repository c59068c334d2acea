"""The Prefect tasks: each is one step, thin (config -> call -> Zarr write -> small summary)."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import zarr
from prefect import get_run_logger, task
from prefect.runtime import flow_run

from tasks.config import RunConfig, apply_override, config_from_dict, load_config
from tasks.filter.flags import filter_features, read_flags
from tasks.fingerprint import Fingerprints
from tasks.fit.fitting import fit_modality
from tasks.groups import assign_groups_in_store, read_groups
from tasks.ingest import ingest_modality, read_cells_table, write_cells
from tasks.ingest.matrix import ModalityPlan
from tasks.ingest.preflight import check_run
from tasks.orchestration import provenance
from tasks.orchestration.artifacts import (
    Progress,
    artifact_key,
    publish_exclusions,
    publish_reports,
    publish_run_page,
)
from tasks.orchestration.run_logging import send_library_logs
from tasks.results.run_page import remove_run_page
from tasks.sample.sampling import SampleRequest, sample_modality
from tasks.stage_meter import StageMeter
from tasks.store import (
    CELLS,
    CIS_KEY,
    COMPLETE,
    GROUPS,
    fit_key,
    inputs_key,
    is_unchanged,
    open_root,
    prep_key,
    results_key,
)


def _timed(fn):
    """A step's summary (a dict) gains its wall time in seconds and its peak memory
    (`tasks.stage_meter`), recorded in the store's root attributes (`steps`) by `finalize`
    and shown on the run's page."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with StageMeter() as meter:
            result = fn(*args, **kwargs)
        summary = result if isinstance(result, dict) else {"result": result}
        return summary | meter.use.as_dict()

    wrapper.__annotations__ = {**fn.__annotations__, "return": dict[str, Any]}
    return wrapper


def _sends_library_logs(fn):
    """The task's own and the model's `logging.getLogger(__name__)` lines go to its run's
    logs too, in whichever process it runs (a Dask worker's as well): `send_library_logs`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        send_library_logs()
        return fn(*args, **kwargs)

    return wrapper


def resolve_config(config: str | Path | dict, overrides: list[str]) -> RunConfig:
    """A config path (with `--set` overrides) or an already-parsed mapping."""
    if isinstance(config, dict):
        for item in overrides:
            config = apply_override(dict(config), item)
        return config_from_dict(config, Path.cwd())
    return load_config(config, overrides)


@task(name="withdraw-completion", task_run_name="withdraw-completion")
@_sends_library_logs
def withdraw_completion(cfg: RunConfig, modalities: list[str], prints: Fingerprints) -> None:
    """After pre-flight: an earlier run's store stops claiming more than it holds.

    The root's `complete` always goes (this run is in progress), and so does that of every
    group this run will rewrite because something it depends on changed: a run that
    fails from here on leaves no store that passes for the result of this config. Groups
    whose inputs are unchanged keep their mark: the steps that wrote them are skipped.
    (A run refused in pre-flight has not come here: the store is as it was.)
    """
    remove_run_page(cfg.store)  # it described the store as it was
    if not (Path(cfg.store) / "zarr.json").exists():
        return
    root = open_root(cfg.store)
    if COMPLETE in root.attrs:
        del root.attrs[COMPLETE]
    for key, fingerprint in _step_keys(cfg, modalities, prints):
        if key in root and root[key].attrs.get("fingerprint") != fingerprint:
            if COMPLETE in root[key].attrs:
                del root[key].attrs[COMPLETE]
    if _stale_cis(root, cfg, modalities, prints) and COMPLETE in root[CIS_KEY].attrs:
        del root[CIS_KEY].attrs[COMPLETE]


def _step_keys(cfg: RunConfig, modalities: list[str], prints: Fingerprints):
    """(store key, fingerprint) of every step of this run."""
    yield CELLS, prints.cells
    yield GROUPS, prints.groups
    for name in modalities:
        yield inputs_key(name), prints.ingest[name]
        yield prep_key(name), prints.filter[name]
        yield fit_key(name), prints.fit[name]
        yield results_key(name), prints.sample[name]
        if cfg.modalities[name].cis_feature is not None:
            yield CIS_KEY, prints.sample[name]


def _stamp(root: zarr.Group, key: str, fingerprint: str) -> None:
    root[key].attrs["fingerprint"] = fingerprint


def _stale_cis(
    root: zarr.Group, cfg: RunConfig, modalities: list[str], prints: Fingerprints
) -> bool:
    """`technical/cis` belongs to a modality of this run and is not this run's result:
    the modality no longer names a cis feature, or its inputs changed. The cis group of
    a killed sampling of the same inputs is kept: the resumed sampling writes into it."""
    if CIS_KEY not in root:
        return False
    owner = root[CIS_KEY].attrs.get("modality")
    if owner not in modalities:
        return False
    fingerprint = prints.sample[owner]
    return cfg.modalities[owner].cis_feature is None or not (
        is_unchanged(root, CIS_KEY, fingerprint)
        or _interrupted_sampling(root, results_key(owner), fingerprint)
    )


def _interrupted_sampling(root: zarr.Group, key: str, fingerprint: str) -> bool:
    """A killed sampling of the same inputs, which `sample_modality` resumes."""
    if key not in root:
        return False
    attrs = root[key].attrs
    return (
        attrs.get("fingerprint") == fingerprint
        and not attrs.get(COMPLETE)
        and "batches_done" in attrs
        and "sampling_batch_size" in attrs
    )


@task(name="preflight", task_run_name="preflight")
@_sends_library_logs
def preflight(
    cfg: RunConfig, modalities: list[str]
) -> tuple[Fingerprints, dict[str, ModalityPlan], dict[str, Any]]:
    """Every check of the inputs (store location, cells table, groups, matrices and their
    values), read-only, before anything is written; then each step's fingerprint. Also
    returns what the checks used (wall time, peak memory)."""
    log = get_run_logger()
    with StageMeter() as meter:
        prints, plans = check_run(cfg, modalities, log)
    log.info("Pre-flight passed: modalities %s", ", ".join(plans))
    return prints, plans, meter.use.as_dict()


@task(name="create-store", task_run_name="create-store")
@_sends_library_logs
@_timed
def create_store(cfg: RunConfig, modalities: list[str], prints: Fingerprints) -> dict[str, Any]:
    """Open (or create) the store, record the config, and (re)write the cells if changed."""
    root = open_root(cfg.store, create=True)
    if COMPLETE in root.attrs:
        del root.attrs[COMPLETE]
    if _stale_cis(root, cfg, modalities, prints):
        del root[CIS_KEY]
    root.attrs.update(
        {"config": json.loads(cfg.model_dump_json()), "provenance": provenance.describe()}
    )
    skipped = is_unchanged(root, CELLS, prints.cells)
    if skipped:
        get_run_logger().info("Cells table unchanged: kept '%s'", CELLS)
    else:
        write_cells(root, read_cells_table(cfg), cfg.covariates, cfg.sum_factor_col)
        _stamp(root, CELLS, prints.cells)
    return {"result": str(cfg.store), "skipped": skipped}


@task(name="ingest", task_run_name="ingest-{name}")
@_sends_library_logs
@_timed
def ingest(
    cfg: RunConfig, name: str, plan: ModalityPlan, prints: Fingerprints
) -> dict[str, Any]:
    """Copy a modality's matrix into the store, chunked, in the cells table's order."""
    root, key = open_root(cfg.store), inputs_key(name)
    skipped = is_unchanged(root, key, prints.ingest[name])
    if skipped:
        get_run_logger().info("Modality '%s': input files unchanged, ingestion skipped", name)
    else:
        ingest_modality(root, cfg, name, plan, get_run_logger())
        _stamp(root, key, prints.ingest[name])
    return {"result": f"{cfg.store}/{key}", "skipped": skipped}


@task(name="assign-groups", task_run_name="assign-groups")
@_sends_library_logs
@_timed
def assign_groups(cfg: RunConfig, prints: Fingerprints) -> dict[str, Any]:
    """Technical groups from the covariates; returns the labels in code order."""
    root = open_root(cfg.store)
    skipped = is_unchanged(root, GROUPS, prints.groups)
    if not skipped:
        assign_groups_in_store(
            root,
            use_all_cells=cfg.use_all_cells,
            policy=cfg.groups_without_ntc,
            baseline=cfg.baseline_group,
        )
        _stamp(root, GROUPS, prints.groups)
    return {"result": read_groups(root).labels, "skipped": skipped}


@task(name="filter-features", task_run_name="filter-features-{name}")
@_sends_library_logs
@_timed
def filter_step(cfg: RunConfig, name: str, prints: Fingerprints) -> dict[str, Any]:
    """NTC filters; returns the number of features flagged by each reason."""
    root, key = open_root(cfg.store), prep_key(name)
    skipped = is_unchanged(root, key, prints.filter[name])
    if skipped:
        get_run_logger().info("Modality '%s': filters unchanged, skipped", name)
        flags = read_flags(root, name)
    else:
        flags = filter_features(root, name, read_groups(root), get_run_logger())
        _stamp(root, key, prints.filter[name])
    publish_exclusions(root, name, get_run_logger())
    return {k: int(v.sum()) for k, v in flags.as_dict().items()} | {"skipped": skipped}


@task(name="fit", task_run_name="fit-{name}")
@_sends_library_logs
@_timed
def fit(cfg: RunConfig, name: str, prints: Fingerprints) -> dict[str, Any]:
    """SVI fit of one modality (skipped when unchanged, resumed when killed)."""
    root, key = open_root(cfg.store), fit_key(name)
    if is_unchanged(root, key, prints.fit[name]):
        get_run_logger().info("Modality '%s': fit inputs unchanged, fit skipped", name)
        attrs = root[key].attrs
        return {
            "niters_run": attrs["niters_run"],
            "stop_reason": attrs["stop_reason"],
            "skipped": True,
        }
    return fit_modality(root, name, cfg.fit, get_run_logger(), fingerprint=prints.fit[name])


@task(name="sample", task_run_name="sample-{name}")
@_sends_library_logs
@_timed
def sample(cfg: RunConfig, name: str, prints: Fingerprints) -> dict[str, Any]:
    """Posterior draws of one modality into its preallocated results (resumed when killed)."""
    root, key = open_root(cfg.store), results_key(name)
    if is_unchanged(root, key, prints.sample[name]):
        get_run_logger().info("Modality '%s': results unchanged, sampling skipped", name)
        attrs = root[key].attrs
        return {
            "sampling_seconds": attrs["sampling_seconds"],
            "batch_size": attrs["sampling_batch_size"],
            "skipped": True,
        }
    request = SampleRequest(
        nsamples=cfg.fit.nsamples,
        seed=cfg.fit.seed,
        minibatch_size=cfg.fit.minibatch_size,
        device=cfg.fit.device,
        cis_feature=cfg.modalities[name].cis_feature,
        fingerprint=prints.sample[name],
    )
    progress = Progress(
        artifact_key("sample-progress", name, store=cfg.store), f"{name}: posterior", unit="batch"
    )
    summary = sample_modality(root, name, request, get_run_logger(), on_batch=progress.update)
    progress.finish()
    _stamp(root, key, prints.sample[name])
    if request.cis_feature is not None:
        _stamp(root, CIS_KEY, prints.sample[name])
    return summary


@task(name="finalize", task_run_name="finalize")
@_sends_library_logs
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
    names = [n for n in cfg.modalities if n in summaries]
    page = publish_run_page(
        root, cfg.store, names, flow_run=_flow_run_text(), log=get_run_logger()
    )
    publish_reports(root, cfg.store, names, page=page)
    get_run_logger().info("Store complete: %s", cfg.store)
    return str(cfg.store)


def _flow_run_text() -> str | None:
    """'<name> (<id>)' of the flow run this task belongs to, if any."""
    return f"{flow_run.name} ({flow_run.id})" if flow_run.id else None


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
