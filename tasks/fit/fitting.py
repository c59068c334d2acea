"""The SVI fit of one modality: read the fit data, fit, store the guide and the loss."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

import numpy as np
import zarr

from bayesdream_model.distributions import PriorOptions, get_family
from bayesdream_model.fit import FitOptions, FittedModel, fit_technical, restore_fitted
from bayesdream_model.inference import Checkpointing
from tasks.config import FitConfig
from tasks.errors import StoreError
from tasks.filter.flags import read_flags
from tasks.fit.checkpoint import decode_state, encode_state
from tasks.fit.data import fit_data
from tasks.groups import GroupAssignment, read_groups
from tasks.orchestration.artifacts import Progress, artifact_key
from tasks.resources import resolve_device, sampling_budget, set_torch_threads, total_vram
from tasks.selection import select_fit
from tasks.store import (
    COMPLETE,
    FIT_FEATURE,
    STEP,
    fit_key,
    fresh_group,
    generic_dims,
    mark_complete,
    write_array,
)

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"
REFINEMENT = "refinement"  # subgroup of fit/<name>: what the posterior draws are refined with
FLAGS = "flags"  # subgroup of fit/<name>: per-fit-feature flags the results carry
INPUT_ORDER = "order"  # attr of fit/<name>/inputs: the prior inputs in the family's order


class ProgressLogger:
    """Logs SVI progress every `every` steps (and on the last); a progress artifact and bar."""

    def __init__(
        self, log: logging.Logger, name: str, *, store: zarr.Group, every: int = 500
    ) -> None:
        self.log, self.name, self.every = log, name, every
        self.start = time.perf_counter()
        key = artifact_key("fit-progress", name, store=store)
        self.progress = Progress(key, f"{name}: SVI", unit="step", log=log)

    def __call__(self, step: int, niters: int, loss: float) -> None:
        """The callback handed to the SVI loop."""
        self.progress.update(step + 1, niters)
        if step % self.every == 0 or step + 1 == niters:
            rate = (step + 1) / max(time.perf_counter() - self.start, 1e-9)
            self.log.info(
                "%s: SVI step %d/%d (%.0f%%), loss %.4e, %.1f steps/s",
                self.name,
                step + 1,
                niters,
                100 * (step + 1) / niters,
                loss,
                rate,
            )


def fit_modality(
    root: zarr.Group,
    name: str,
    fit: FitConfig,
    log: logging.Logger | None = None,
    *,
    fingerprint: str | None = None,
) -> dict:
    """Fit `name` on its fit features; writes `fit/<name>/` (complete last). Returns a summary.

    A fit of the same inputs (`fingerprint`) that was killed resumes from its checkpoint.
    """
    log = log or logger
    priors = PriorOptions(
        multinomial_baseline=fit.multinomial_baseline_prior,
        negbinom_baseline=fit.negbinom_baseline_prior,
        continuous=fit.continuous_prior,
    )
    features = np.flatnonzero(read_flags(root, name).technical_correction_applied)
    selection = select_fit(root, name, read_groups(root), features)  # read once
    family = selection.family.configured(priors)
    device = resolve_device(fit.device)
    threads = set_torch_threads(fit.threads)
    plan, data, how = fit_data(root, selection, fit, sampling_budget(device))
    log.info("Modality '%s': %s", name, plan.reason)
    log.info(
        "Modality '%s': fitting %s on %d cells x %d features (%s), %d groups, device %s "
        "(%d threads)",
        name,
        family.spec.name,
        data.n_cells,
        data.n_features,
        how,
        data.n_groups,
        device,
        threads,
    )
    options = FitOptions(
        niters=fit.niters,
        lr=fit.lr,
        tolerance=fit.tolerance,
        seed=fit.seed,
        device=device,
        vram_bytes=total_vram(device),
        guide=fit.guide,
        convergence=fit.convergence,
        init=fit.init,
        label=f"modality '{name}'",
    )
    group, state = _fit_group(root, name, fingerprint)
    if state is not None:
        log.info("Modality '%s': resuming the fit from its checkpoint", name)
    checkpointing = Checkpointing(
        save=lambda st: _save_checkpoint(group, st), state=state, every_s=fit.checkpoint_seconds
    )
    on_progress = ProgressLogger(log, name, store=root)
    fitted = fit_technical(
        family, data, options, on_progress=on_progress, checkpointing=checkpointing
    )
    on_progress.progress.finish()  # a fit that converged early is finished too
    _warn_of_baseline(log, name, selection.groups, selection.codes, fitted)
    group.attrs.update(
        cells_streamed=plan.stream,
        cell_batches=getattr(data, "n_batches", 1),
        fit_matrix_sparse=plan.sparse,
    )
    _write_fit(group, fitted, features, device)
    return {
        "niters_run": fitted.svi.niters_run,
        "stop_reason": fitted.svi.stop_reason,
        "recoveries": len(fitted.svi.recoveries),
        "cells_streamed": plan.stream,
    }


#: a baseline group with fewer of the fit cells than this share is warned of
SMALL_BASELINE = 0.10


def _warn_of_baseline(
    log: logging.Logger, name: str, groups: GroupAssignment, codes: np.ndarray, fitted
) -> None:
    """One warning when the baseline group holds under SMALL_BASELINE of the fit cells or
    lacks counts of fit features that other groups express (at a rate that predicts 3 or
    more counts in it: not the chance zeros of low genes): it gives the counts and names
    the option that picks another baseline."""
    if len(groups.labels) < 2:
        return
    cells = np.bincount(codes, minlength=len(groups.labels))
    none, silent = (fitted.flags.get(k) for k in ("baseline_no_counts", "baseline_silent"))
    n_silent = 0 if silent is None else int(silent.sum())
    share = cells[0] / max(cells.sum(), 1)
    problems = []
    if share < SMALL_BASELINE:
        problems.append(f"holds {cells[0]:,} of {cells.sum():,} fit cells ({share:.1%})")
    if n_silent:
        problems.append(
            f"has no count of {n_silent:,} of {len(silent):,} fit features that the other "
            "groups express at a rate that predicts 3 or more counts in it (with the other "
            f"features it has no count of, {int(none.sum()):,} are flagged "
            "baseline_no_counts: the data bound their effects from one side only)"
        )
    if not problems:
        return
    ranked = sorted(zip(groups.labels, cells, strict=True), key=lambda item: -item[1])
    log.warning(
        "Modality '%s': the baseline group '%s' %s. Effects are relative to the baseline; "
        "name a large group that expresses these features with `baseline_group:` (fit cells "
        "by group: %s).",
        name,
        groups.labels[0],
        ", and ".join(problems),
        ", ".join(f"{label} {count:,}" for label, count in ranked),
    )


def _fit_group(
    root: zarr.Group, name: str, fingerprint: str | None
) -> tuple[zarr.Group, dict | None]:
    """The group of a killed fit of the same inputs (with its checkpoint), else a fresh one."""
    key = fit_key(name)
    if key in root and fingerprint is not None and CHECKPOINT in root[key]:
        group = root[key]
        if group.attrs.get("fingerprint") == fingerprint and not group.attrs.get(COMPLETE):
            state = _load_checkpoint(group)
            if state is not None:
                return group, state
    return fresh_group(root, key, "bayesdream-fit", fingerprint=fingerprint), None


def _load_checkpoint(group: zarr.Group) -> dict | None:
    """The saved SVI state, or None where a kill mid-save left it unreadable (a checkpoint
    is rewritten as a new array: metadata first, then its one chunk), so the fit restarts."""
    try:
        return decode_state(group[CHECKPOINT][...].tobytes())
    except Exception as err:  # whatever makes it unreadable, the fit starts over
        logger.warning(
            "Unreadable fit checkpoint in '%s' (%s): fitting from the start", group.path, err
        )
        return None


def _save_checkpoint(group: zarr.Group, state: dict) -> None:
    """The whole SVI state as one byte array of plain data (`tasks.fit.checkpoint`: JSON and
    numeric arrays, no pickle); a chunk write is atomic (temp file + rename)."""
    data = np.frombuffer(encode_state(state), dtype=np.uint8)
    group.create_array(
        CHECKPOINT,
        shape=data.shape,
        chunks=data.shape,
        dtype="uint8",
        overwrite=True,
        dimension_names=generic_dims(CHECKPOINT, 1),
    )[...] = data


def _write_fit(group: zarr.Group, fitted: FittedModel, features: np.ndarray, device: str) -> None:
    """Guide state, prior inputs, loss trace and how the fit went; the checkpoint goes."""
    start = fitted.svi.start or {}
    group.attrs.update(
        distribution=fitted.family.spec.name,
        guide=fitted.guide_kind,
        device=device,
        n_groups=fitted.model.n_groups,
        niters_run=fitted.svi.niters_run,
        stop_reason=fitted.svi.stop_reason,
        fit_seconds=fitted.svi.seconds,
        recoveries=[asdict(r) for r in fitted.svi.recoveries],
        # the Laplace start (None: the initial values): Newton iterations, gradient
        # evaluations, features that took it; its time apart, with the other timings
        laplace_start={k: v for k, v in start.items() if k != "seconds"} or None,
        laplace_seconds=start.get("seconds"),
    )
    params = group.require_group("params")
    for key, value in fitted.params().items():
        write_array(params, key, value, dims=generic_dims(key, np.ndim(value)))
    inputs = group.require_group("inputs")
    prior_inputs = fitted.prior_inputs()
    for key, value in prior_inputs.items():
        write_array(inputs, key, value, dims=generic_dims(key, np.ndim(value)))
    # A store lists its arrays in no particular order; the model reads T off the first input.
    inputs.attrs[INPUT_ORDER] = list(prior_inputs)
    write_array(group, "loss", fitted.svi.losses.astype(np.float64), dims=(STEP,))
    write_array(group, "features", features.astype(np.int64), dims=(FIT_FEATURE,))
    _write_arrays(group, REFINEMENT, {k: v.cpu().numpy() for k, v in fitted.refinement.items()})
    _write_arrays(group, FLAGS, fitted.flags)
    if CHECKPOINT in group:
        del group[CHECKPOINT]
    mark_complete(group)


def _write_arrays(group: zarr.Group, key: str, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` as the subgroup `key` of the fit group (replaced; absent when empty)."""
    if key in group:
        del group[key]
    if not arrays:
        return
    sub = group.create_group(key)
    for name, value in arrays.items():
        write_array(sub, name, value, dims=generic_dims(name, np.ndim(value)))


def read_fit_flags(root: zarr.Group, name: str) -> dict[str, np.ndarray]:
    """The per-fit-feature flags of `fit/<name>/flags` (bool [T_fit] by name)."""
    group = root[fit_key(name)]
    return {k: a[...].astype(bool) for k, a in group[FLAGS].arrays()} if FLAGS in group else {}


def load_fitted(root: zarr.Group, name: str, *, device: str = "cpu") -> FittedModel:
    """Rebuild the fitted guide stored in `fit/<name>/`."""
    group = root[fit_key(name)]
    stored = dict(group["inputs"].arrays())
    order = list(group["inputs"].attrs.get(INPUT_ORDER, []))
    # Written order first (restore_fitted takes T from the first input); then the rest,
    # widest first, for stores written before the order was recorded.
    order += sorted(set(stored) - set(order), key=lambda k: (-stored[k].ndim, k))
    family = get_family(group.attrs["distribution"])
    fitted = restore_fitted(
        family,
        inputs={k: stored[k][...] for k in order},
        params={k: a[...] for k, a in group["params"].arrays()},
        guide_kind=group.attrs["guide"],
        n_groups=int(group.attrs["n_groups"]),
        device=device,
        refinement={k: a[...] for k, a in group[REFINEMENT].arrays()}
        if REFINEMENT in group
        else None,
    )
    # T as the family reads it (the first input's last axis is K for 3-D families).
    n_features = family.n_features(fitted.model.inputs)
    n_fit = int(group["features"].shape[0])
    if n_features != n_fit:
        raise StoreError(
            f"Store key '{fit_key(name)}': the stored prior inputs describe {n_features} "
            f"features but '{fit_key(name)}/features' lists {n_fit}; run the fit step again."
        )
    return replace(fitted, n_features=n_features)
