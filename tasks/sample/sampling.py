"""Posterior draws of one modality, written batch by batch into preallocated Zarr arrays.

Results cover ALL features of the modality (excluded ones at baseline / NaN), except the
cis feature, whose draws go to `technical/cis/` under its `_x` names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import zarr

from bayesdream_model.distributions import OutputSpec
from bayesdream_model.memory import plan_sampling
from bayesdream_model.posterior import draw_range
from tasks.filter.flags import read_flags
from tasks.fit.fitting import load_fitted, read_fit_flags
from tasks.groups import read_groups
from tasks.resources import resolve_device, sampling_budget
from tasks.selection import fit_cell_index
from tasks.store import (
    CATEGORY,
    CIS_KEY,
    COMPLETE,
    DRAW,
    FEATURE,
    FIT_FLAGS,
    GROUP,
    NONBASELINE_GROUP,
    STEP,
    fit_key,
    fresh_group,
    inputs_key,
    mark_complete,
    read_strings,
    results_key,
    write_array,
    write_coordinates,
    write_strings,
)

logger = logging.getLogger(__name__)
FEATURE_CHUNK_OUT = 4096
CIS_NAMES = {
    "alpha_y": "alpha_x",
    "alpha_y_mult": "alpha_x_mult",
    "alpha_y_add": "alpha_x_add",
    "log2_alpha_y": "log2_alpha_x",
    "o_y": "o_x",
    "phi_y": "phi_x",
    "mu_ntc": "mu_ntc",
}


@dataclass(frozen=True)
class FeatureLayout:
    """Where each fit feature's draws go: a column of the results, or the cis group."""

    n_results: int  # features in technical/<modality> (cis removed)
    fit_to_result: np.ndarray  # [T_fit] column in the results, -1 for the cis feature
    cis_fit_column: int | None  # the cis feature's column among the fit features


def feature_layout(names: np.ndarray, fit_features: np.ndarray, cis: str | None) -> FeatureLayout:
    """Map fit features (indices into `names`) to result columns, cis taken out."""
    cis_index = None if cis is None else int(np.flatnonzero(names == cis)[0])
    keep = np.ones(len(names), bool)
    if cis_index is not None:
        keep[cis_index] = False
    column = np.cumsum(keep) - 1
    fit_to_result = np.where(keep[fit_features], column[fit_features], -1)
    hits = np.flatnonzero(fit_features == cis_index) if cis_index is not None else []
    return FeatureLayout(int(keep.sum()), fit_to_result, int(hits[0]) if len(hits) else None)


def output_shape(
    out: OutputSpec, n_samples: int, n_groups: int, n_features: int, n_categories: int | None
) -> tuple[int, ...]:
    """[S], [S, T], [S, C, T] or [S, C-1, T]; with K after T where T is not last (3-D)."""
    lead = {"effect": (n_groups,), "raw": (n_groups - 1,), "feature": (), "scalar": None}[out.kind]
    if lead is None:
        return (n_samples,)
    trail = () if out.feature_axis == -1 else (n_categories,)
    return (n_samples, *lead, n_features, *trail)


def _dims(out: OutputSpec, *, with_feature: bool = True) -> tuple[str, ...]:
    """Dimension names matching `output_shape`: (draw, group | nonbaseline_group, feature(, category))."""
    lead = {"effect": (GROUP,), "raw": (NONBASELINE_GROUP,), "feature": (), "scalar": None}
    if lead[out.kind] is None:
        return (DRAW,)
    trail = () if out.feature_axis == -1 else (CATEGORY,)
    return (DRAW, *lead[out.kind], *((FEATURE,) if with_feature else ()), *trail)


def _create_outputs(group: zarr.Group, outputs, shape_args, batch: int) -> dict[str, zarr.Array]:
    """Full-size arrays filled with each output's baseline/NaN before sampling starts."""
    arrays = {}
    for out in outputs:
        shape = output_shape(out, *shape_args)
        chunks = (batch, *(max(1, min(s, FEATURE_CHUNK_OUT)) for s in shape[1:]))
        arrays[out.name] = group.create_array(
            out.name,
            shape=shape,
            chunks=chunks,
            dtype="float32",
            fill_value=out.fill,
            overwrite=True,
            dimension_names=_dims(out),
        )
    return arrays


@dataclass(frozen=True)
class SampleRequest:
    """What to draw: how many, the seed, the batch size (None = planned), where, the cis
    feature, and the fingerprint of the inputs (a killed run of the same one resumes)."""

    nsamples: int
    seed: int = 0
    minibatch_size: int | None = None
    device: str = "cpu"
    cis_feature: str | None = None
    fingerprint: str | None = None


BatchFn = Callable[[int, int], None]  # (batches written, batches in all)


def sample_modality(
    root: zarr.Group,
    name: str,
    request: SampleRequest,
    log: logging.Logger | None = None,
    on_batch: BatchFn | None = None,
) -> dict:
    """Draw posterior samples into `technical/<name>/` (and `technical/cis/`), batch by batch."""
    log = log or logger
    nsamples, seed, cis_feature = request.nsamples, request.seed, request.cis_feature
    start_time = time.perf_counter()
    fit_group = root[fit_key(name)]
    device = resolve_device(request.device)
    fitted = load_fitted(root, name, device=device)
    family, n_groups = fitted.family, fitted.model.n_groups
    names = read_strings(root[inputs_key(name)], "feature_names")
    layout = feature_layout(names, fit_group["features"][...], cis_feature)
    n_categories = family.n_categories(fitted.model.inputs)  # K for 3-D families, else None
    plan = _sampling_plan(root, name, fitted, request, device)
    log.info("Modality '%s': sampling plan: %s", name, plan.reason)
    outputs = family.outputs()
    shape_args = (nsamples, n_groups, layout.n_results, n_categories)
    group, plan, arrays, cis, done = _open_outputs(
        root, name, request, plan, (outputs, shape_args), log
    )
    writer = _BatchWriter(outputs, arrays, cis, layout)
    for start, stop in plan.batches():
        if start in done:
            continue
        for span, batch in _draw_halving_on_oom(fitted, (start, stop), seed, plan.parallel, log):
            writer.write(span, batch)
        done.append(start)
        group.attrs["batches_done"] = done  # after the batch's chunks are on disk
        if on_batch is not None:
            on_batch(len(done), plan.n_batches)
    seconds = time.perf_counter() - start_time
    _write_metadata(root, group, name, (names, n_categories, nsamples), cis_feature, fit_group)
    group.attrs.update(
        {
            "distribution": family.spec.name,
            "effect_type": family.spec.effect_type,
            "nsamples": nsamples,
            "sampling_seconds": seconds,
            "sampling_batch_size": plan.batch_size,
        }
    )
    if cis is not None:
        mark_complete(root[CIS_KEY])
    mark_complete(group)
    log.info("Modality '%s': %d draws in %.1f s", name, nsamples, seconds)
    return {"sampling_seconds": seconds, "batch_size": plan.batch_size}


def _sampling_plan(root: zarr.Group, name: str, fitted, request: SampleRequest, device: str):
    """Draws per batch for this fit within the device's memory (a 3-D family's K
    categories count as K features each)."""
    n_categories = fitted.family.n_categories(fitted.model.inputs)
    n_cells = len(fit_cell_index(root, name, read_groups(root)))
    return plan_sampling(
        nsamples=request.nsamples,
        shape=(n_cells, fitted.n_features * (n_categories or 1), fitted.model.n_groups),
        budget=sampling_budget(device),
        user_batch=request.minibatch_size,
    )


def _open_outputs(root: zarr.Group, name: str, request: SampleRequest, plan, spec, log):
    """(results group, plan, output arrays, cis arrays or None, batches already written).

    A fresh start creates every array at full size before the first draw; a killed run of
    the same inputs (`request.fingerprint`) keeps its arrays and its batch size, and the
    batches it wrote are skipped."""
    outputs, shape_args = spec
    nsamples, n_groups, cis_feature = request.nsamples, shape_args[1], request.cis_feature
    group, done = _results_group(root, name, request.fingerprint)
    if done is None:
        group.attrs.update(sampling_batch_size=plan.batch_size, batches_done=[])
        arrays = _create_outputs(group, outputs, shape_args, plan.batch_size)
        cis = _create_cis(root, outputs, nsamples, n_groups, plan.batch_size, cis_feature, name)
        return group, plan, arrays, cis, []
    plan = replace(plan, batch_size=int(group.attrs["sampling_batch_size"]))
    arrays = {out.name: group[out.name] for out in outputs}
    cis = dict(root[CIS_KEY].arrays()) if cis_feature is not None else None
    log.info(
        "Modality '%s': resuming sampling, %d of %d batches already written",
        name,
        len(done),
        plan.n_batches,
    )
    return group, plan, arrays, cis, done


def _results_group(
    root: zarr.Group, name: str, fingerprint: str | None
) -> tuple[zarr.Group, list[int] | None]:
    """A killed run's results group of the same inputs with its written batches, else fresh."""
    key = results_key(name)
    if key in root and fingerprint is not None:
        group = root[key]
        attrs = group.attrs
        if attrs.get("fingerprint") == fingerprint and not attrs.get(COMPLETE):
            if "batches_done" in attrs and "sampling_batch_size" in attrs:
                return group, list(attrs["batches_done"])
    return fresh_group(root, key, "bayesdream-technical", fingerprint=fingerprint), None


def _draw_halving_on_oom(fitted, span: tuple[int, int], seed: int, parallel: bool, log):
    """Draw a batch; out of memory (CPU or CUDA) retries it as two halves, logged."""
    start, stop = span
    try:
        return [(span, draw_range(fitted, start, stop, seed=seed, parallel=parallel))]
    except (MemoryError, torch.cuda.OutOfMemoryError):
        if stop - start == 1:
            raise
        middle = (start + stop) // 2
        log.warning(
            "Out of memory drawing posterior samples %d-%d: retrying as %d-%d and %d-%d",
            start,
            stop,
            start,
            middle,
            middle,
            stop,
        )
        return _draw_halving_on_oom(fitted, (start, middle), seed, parallel, log) + (
            _draw_halving_on_oom(fitted, (middle, stop), seed, parallel, log)
        )


class _BatchWriter:
    """Scatters a batch of fit-feature results into the full-size arrays (and the cis group)."""

    def __init__(self, outputs, arrays, cis_arrays, layout: FeatureLayout) -> None:
        self.outputs, self.arrays, self.cis, self.layout = outputs, arrays, cis_arrays, layout
        self.in_results = layout.fit_to_result >= 0

    def write(self, span: tuple[int, int], batch: dict[str, np.ndarray]) -> None:
        """Every output's region for draws span[0]..span[1]."""
        start, stop = span
        column = self.layout.cis_fit_column
        for out in self.outputs:
            _write_batch(
                self.arrays[out.name], out, batch[out.name], span, self.layout, self.in_results
            )
            if self.cis and out.name in CIS_NAMES and column is not None:
                self.cis[CIS_NAMES[out.name]][start:stop] = batch[out.name][..., column]


def _write_batch(array, out: OutputSpec, values, span, layout: FeatureLayout, in_results) -> None:
    """Scatter a batch's fit-feature values into the full-size array's region."""
    start, stop = span
    if out.kind == "scalar":
        array[start:stop] = values
        return
    region = np.full((stop - start, *array.shape[1:]), out.fill, dtype=np.float32)
    target = np.moveaxis(region, out.feature_axis, 0)
    target[layout.fit_to_result[in_results]] = np.moveaxis(values, out.feature_axis, 0)[in_results]
    array[start:stop] = region


def _create_cis(root, outputs, nsamples, n_groups, batch, cis_feature, modality):
    """`technical/cis/` arrays [S, C] / [S, C-1] / [S] at baseline/NaN; None without cis."""
    if cis_feature is None:
        return None
    group = fresh_group(root, CIS_KEY, "bayesdream-cis", feature=cis_feature, modality=modality)
    renamed = [
        OutputSpec(CIS_NAMES[o.name], "scalar" if o.kind == "feature" else o.kind, o.fill)
        for o in outputs
        if o.name in CIS_NAMES
    ]
    arrays = {}
    for out in renamed:
        shape = output_shape(out, nsamples, n_groups, 1, None)
        shape = shape if out.kind == "scalar" else shape[:-1]
        arrays[out.name] = group.create_array(
            out.name,
            shape=shape,
            chunks=(batch, *(max(1, s) for s in shape[1:])),
            dtype="float32",
            fill_value=out.fill,
            overwrite=True,
            dimension_names=_dims(out, with_feature=False),
        )
    return arrays


def _fit_flags(root, name: str, n_features: int, fit_group) -> dict[str, np.ndarray]:
    """The fit's per-feature flags (`FIT_FLAGS`) over every feature of the modality (False
    where a feature was not fit)."""
    fitted = read_fit_flags(root, name)
    index = fit_group["features"][...]
    out = {}
    for flag in FIT_FLAGS:
        values = np.zeros(n_features, dtype=bool)
        if flag in fitted:
            values[index] = fitted[flag]
        out[flag] = values
    return out


def _write_metadata(root, group, name, axes, cis_feature, fit_group) -> None:
    """Names, labels, flags and the loss trace travel with the results, and the coordinate
    arrays (`feature`, `group`, `nonbaseline_group`, `category`, `draw`) that xarray reads;
    `baseline_group` / `baseline_rule` say which group is code 0 and why."""
    names, n_categories, n_draws = axes
    keep = names != cis_feature if cis_feature is not None else np.ones(len(names), bool)
    assignment = read_groups(root)
    labels = assignment.labels
    baseline = {"baseline_group": assignment.baseline, "baseline_rule": assignment.baseline_rule}
    write_strings(group, "feature_names", names[keep], dims=(FEATURE,))
    write_strings(group, "group_labels", labels, dims=(GROUP,))
    write_coordinates(
        group,
        features=names[keep],
        groups=labels,
        nonbaseline=True,
        n_categories=n_categories,
        n_draws=n_draws,
    )
    flags = read_flags(root, name).as_dict() | _fit_flags(root, name, len(names), fit_group)
    for flag, values in flags.items():
        write_array(group, flag, values[keep], dims=(FEATURE,))
    write_array(group, "loss", fit_group["loss"][...], dims=(STEP,))
    group.attrs.update(
        {
            key: fit_group.attrs[key]
            for key in ("guide", "device", "niters_run", "fit_seconds", "stop_reason")
        }
        | baseline
    )
    if cis_feature is not None:
        cis = root[CIS_KEY]
        cis.attrs.update(baseline)
        write_coordinates(cis, groups=labels, nonbaseline=True, n_draws=n_draws)
        for flag, values in flags.items():
            cis.attrs[flag] = bool(values[~keep][0])
