"""The per-distribution benchmark's workers, run in fresh subprocesses by
`bench_distributions.py --worker steps|flow`: (a) ms per SVI step, ours or the dense
baseline, through `fit_technical`; (b) the real Prefect flow at default fit settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import RssSampler, load_average, mb, vm_hwm_bytes

FLOW_STAGES = (
    "preflight",
    "create_store",
    "assign_groups",
    "ingest",
    "filter_step",
    "fit",
    "sample",
    "finalize",
)


def timed_task(original, label: str, records: list[dict[str, Any]]):
    """A Prefect task running `original`'s function and recording its wall time."""
    from prefect import task

    @functools.wraps(original.fn)
    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return original.fn(*a, **k)
        finally:
            records.append({"stage": label, "start": start, "stop": time.perf_counter()})

    return task(name=original.name)(timed)


# ---------------------------------------------------------------------------------------
# Worker (a): ms per SVI step, ours or dense, through fit_technical
# ---------------------------------------------------------------------------------------
def set_threads(requested: int | None) -> int:
    """The pipeline's own rule (tasks.resources.set_torch_threads): `--threads`, else its
    default (what `fit.threads: null` gives in the flow)."""
    from tasks.resources import set_torch_threads

    return set_torch_threads(requested)


def use_dense_likelihood(family, name: str) -> str:
    """Swap the family's likelihood for the dense per-cell baseline; returns its name."""
    import pyro

    import bayesdream_model.dense_likelihoods as baselines
    from bayesdream_model.constants import OBS_SITE
    from bayesdream_model.data import FitTensors

    fn_name = f"dense_log_likelihood_{name}"
    dense = getattr(baselines, fn_name)

    def tensors(data, device):
        return FitTensors.from_arrays(data, device)

    def observe(params, data, plates):
        log_lik = dense(params, data)
        pyro.factor(OBS_SITE, log_lik.sum() if log_lik.dim() else log_lik)

    # instance attributes shadow the class's methods for this process only
    family.tensors = tensors
    family.observe = observe
    return f"baselines.{fn_name}"


def worker_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Time `--warmup + --steps` SVI steps of `--impl` (ours / dense) for `--dist`."""
    import torch

    from bayesdream_model.data import FitArrays
    from bayesdream_model.distributions import get_family
    from bayesdream_model.fit import FitOptions, fit_technical

    folder = Path(args.workdir)
    with np.load(folder / "fitdata.npz") as f:
        arrays = {k: f[k] for k in f.files}
    family = get_family(args.dist)
    data = FitArrays(
        y=arrays["y"],
        groups=arrays["groups"],
        n_groups=args.groups,
        sum_factor=arrays["sum_factor"],
        denominator=arrays.get("denominator"),
    )
    keep = family.flags(data).technical_correction_applied
    data = data.select_features(keep)
    threads = set_threads(args.threads)
    likelihood = "family.observe (ours)"
    if args.impl == "dense":
        likelihood = use_dense_likelihood(family, args.dist)
    n_steps = args.warmup + args.steps
    stamps: list[float] = []
    # init "prior": the step alone is timed (the Laplace start is a stage of the flow run)
    options = FitOptions(niters=n_steps, seed=args.seed, device="cpu", init="prior")
    with RssSampler() as rss:
        t0 = time.perf_counter()
        fitted = fit_technical(
            family, data, options, on_progress=lambda *_: stamps.append(time.perf_counter())
        )
        t1 = time.perf_counter()
    timed = np.diff(np.asarray(stamps[args.warmup - 1 :] if args.warmup else [t0, *stamps]))
    timed_ms = timed * 1000.0
    return {
        "impl": args.impl,
        "likelihood": likelihood,
        "guide": fitted.guide_kind,
        "n_cells": data.n_cells,
        "n_features_fit": data.n_features,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "steps_run": len(stamps),
        "steps_timed": int(timed_ms.size),
        "ms_per_step_median": round(float(np.median(timed_ms)), 2) if timed_ms.size else None,
        "ms_per_step_mean": round(float(timed_ms.mean()), 2) if timed_ms.size else None,
        "ms_per_step_min": round(float(timed_ms.min()), 2) if timed_ms.size else None,
        "ms_per_step_max": round(float(timed_ms.max()), 2) if timed_ms.size else None,
        "setup_and_first_step_seconds": round(stamps[0] - t0, 2) if stamps else None,
        "total_seconds": round(t1 - t0, 2),
        "final_loss": float(fitted.svi.losses[-1]),
        "rss_peak_mb": mb(rss.peak(t0, t1)),
        "vm_hwm_mb": mb(vm_hwm_bytes()),  # own peak (ru_maxrss is inherited at exec)
        "load_average_at_end": load_average(),
    }


# ---------------------------------------------------------------------------------------
# Worker (b): the real Prefect flow, default fit settings
# ---------------------------------------------------------------------------------------
def flow_config(args: argparse.Namespace, folder: Path, modality: dict) -> dict[str, Any]:
    """The run config: fit section at defaults except nsamples (and --niters if given)."""
    fit: dict[str, Any] = {"nsamples": args.nsamples}
    if args.niters is not None:
        fit["niters"] = args.niters
    if args.threads is not None:
        fit["threads"] = args.threads
    if args.cell_batch is not None:  # the fit cells streamed in batches of this many
        fit.update(stream_cells="always", cell_batch=args.cell_batch)
    config = {
        "store": str(folder / "run.zarr"),
        "cells": str(folder / "inputs" / "cells.csv"),
        "covariates": ["cell_line"],
        "sum_factor_col": "sum_factor",
        "modalities": {args.dist: modality},
        "fit": fit,
    }
    extra = folder / "config_extra.json"  # a benchmark's own settings (baseline_group, fit)
    if extra.exists():
        more = json.loads(extra.read_text())
        config["fit"] |= more.pop("fit", {})
        config |= more
    return config


def worker_flow(args: argparse.Namespace) -> dict[str, Any]:
    """Run `technical_fit` on the inputs; per-stage wall time, RSS and the store's attrs."""
    import torch
    import zarr

    import flows.technical_fit as ft

    folder = Path(args.workdir)
    modality = json.loads((folder / "modality.json").read_text())
    records: list[dict[str, Any]] = []
    for stage in FLOW_STAGES:  # the flow looks these up in its module at call time
        setattr(ft, stage, timed_task(getattr(ft, stage), stage, records))
    config = flow_config(args, folder, modality)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        store = ft.technical_fit(config)
        t1 = time.perf_counter()
    stages = {}
    if records:
        stages["flow_startup"] = {"seconds": round(records[0]["start"] - t0, 2)}
    for rec in records:
        stages[rec["stage"]] = {
            "seconds": round(rec["stop"] - rec["start"], 2),
            "rss_peak_mb": mb(rss.peak(rec["start"], rec["stop"])),
        }
    root = zarr.open_group(store, mode="r")
    attrs = dict(root[f"technical/{args.dist}"].attrs)
    fit_attrs = dict(root[f"fit/{args.dist}"].attrs)  # the Laplace start is recorded there
    return {
        "store": store,
        "config_fit": config["fit"],
        "flow_call_seconds": round(t1 - t0, 2),
        "stages": stages,
        "fit_seconds": round(float(attrs["fit_seconds"]), 2),
        "laplace_seconds": fit_attrs.get("laplace_seconds"),
        "sampling_seconds": round(float(attrs["sampling_seconds"]), 2),
        "niters_run": int(attrs["niters_run"]),
        "stop_reason": attrs["stop_reason"],
        "guide": attrs["guide"],
        "device": attrs["device"],
        "sampling_batch_size": int(attrs["sampling_batch_size"]),
        "torch_threads_after_flow": torch.get_num_threads(),
        "rss_peak_mb": mb(rss.peak(t0, t1)),
        "vm_hwm_mb": mb(vm_hwm_bytes()),  # own peak (ru_maxrss is inherited at exec)
        "load_average_at_end": load_average(),
    }
