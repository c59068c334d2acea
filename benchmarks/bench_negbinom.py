"""Benchmark of the negbinom technical fit on a simulated NTC screen.

What it measures (default: 4,000 NTC cells x 3,000 genes, 3 technical groups):

1. ms per SVI step of our model, through `bayesdream_model.fit.fit_technical`, with the
   guide the pipeline picks for that size (mean-field: n_latent = (C+1)T > 5000 on CPU);
   with `--iaf`, also the IAF guide on a smaller T (`--iaf-genes`, n_latent <= 5000).
2. The same for a BASELINE kept in this file: a plain dense per-cell implementation of
   the SPEC's negbinom model (same priors, empirical prior inputs and initial values,
   dense NB log-likelihood over all cells x features, Pyro AutoNormal + Trace_ELBO, the
   SPEC's optimiser), written from /work/shared/SPEC.md. Ratios ours / baseline are
   printed for time per step and for the peak RSS during the fit.
3. The whole pipeline end to end through the real Prefect flow
   (`flows.technical_fit.technical_fit`) on inputs written to disk as
   cells.csv + counts.npz (scipy.sparse CSR, features x cells, int32) + features.txt +
   cells.txt: wall time per stage, the store's fit_seconds / sampling_seconds, and peak
   RSS (ru_maxrss, and a psutil RSS sampler for per-stage peaks).
4. Recovery vs the simulated truth from the pipeline's posterior: correlation and RMSE
   of posterior-mean log2 effects (alpha_y_add[:, 1:]) with log2_alpha, and the
   coverage of 90 % central intervals.

Every measured piece runs in a fresh subprocess of this script (hidden `--worker` mode)
so that its ru_maxrss and RSS samples are its own. The simulated screen is drawn once
by the parent and handed to the workers on disk.

Run:  .venv/bin/python benchmarks/bench_negbinom.py [--niters 1000 --nsamples 1000]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "negbinom.json"
MIB = 1024**2
MODALITY = "gene"
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


# ---------------------------------------------------------------------------------------
# Machine, load and memory helpers
# ---------------------------------------------------------------------------------------
def ru_maxrss_mb() -> float:
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """HEAD of the repository (read only)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import pyro
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    vm = psutil.virtual_memory()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_total_gb": round(vm.total / 1e9, 2),
        "ram_available_gb_at_start": round(vm.available / 1e9, 2),
        "torch_version": torch.__version__,
        "pyro_version": pyro.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
        "load_average_at_start": load_average(),
        "git_commit": git_commit(),
    }


class RssSampler:
    """Samples this process's RSS in a background thread; peak over any time window."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (perf_counter, rss MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.process.memory_info().rss / MIB))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        """Current RSS in MiB."""
        return self.process.memory_info().rss / MIB

    def peak(self, start: float = -math.inf, stop: float = math.inf) -> float | None:
        """Largest sampled RSS (MiB) in [start, stop]."""
        samples = list(self.samples)
        values = [rss for t, rss in samples if start <= t <= stop]
        if not values:  # a window shorter than the interval: the last sample before it ends
            values = [rss for t, rss in samples if t <= stop][-1:]
        return round(max(values), 1) if values else None


# ---------------------------------------------------------------------------------------
# The simulated screen on disk (drawn once by the parent)
# ---------------------------------------------------------------------------------------
def group_labels(n_groups: int) -> list[str]:
    """Labels whose sorted order is the code order (code g -> labels[g])."""
    return [f"LINE{g:03d}" for g in range(n_groups)]


def write_inputs(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Simulate the screen; write the pipeline's inputs, the truth and the dense fit data."""
    import pandas as pd
    import scipy.sparse as sp

    from bayesdream_model.simulate import simulate_negbinom_screen

    t0 = time.perf_counter()
    screen = simulate_negbinom_screen(
        n_cells=args.cells,
        n_features=args.genes,
        n_groups=args.groups,
        ntc_fraction=1.0,
        effect_sd=args.effect_sd,
        seed=args.seed,
    )
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(group_labels(args.groups))
    pd.DataFrame(
        {
            "cell": screen.cell_ids,
            "target": np.where(screen.is_ntc, "ntc", "GENE"),
            "guide": np.where(screen.is_ntc, "ntc_1", "GENE_1"),
            "cell_line": labels[screen.groups],
            "sum_factor": screen.sum_factor,
        }
    ).to_csv(inputs / "cells.csv", index=False)
    counts = sp.csr_matrix(screen.counts.astype(np.int32))  # [T, N]
    sp.save_npz(inputs / "counts.npz", counts)
    (inputs / "features.txt").write_text("\n".join(screen.feature_names) + "\n")
    (inputs / "cells.txt").write_text("\n".join(screen.cell_ids) + "\n")
    t_write = time.perf_counter() - t0
    # What the in-process SVI workers fit: NTC cells x all features, dense float32.
    ntc = screen.is_ntc
    np.savez(
        workdir / "fitdata.npz",
        y=np.ascontiguousarray(screen.counts[:, ntc].T, dtype=np.float32),
        groups=screen.groups[ntc].astype(np.int64),
        sum_factor=screen.sum_factor[ntc].astype(np.float32),
    )
    np.savez(
        workdir / "truth.npz",
        log2_alpha=screen.log2_alpha,
        mu=screen.mu,
        phi=screen.phi,
        feature_names=screen.feature_names,
        group_labels=labels,
    )
    return {
        "format": (
            "cells.csv + counts.npz (scipy.sparse CSR, features x cells, int32, "
            "save_npz compressed) + features.txt + cells.txt"
        ),
        "n_cells": args.cells,
        "n_ntc_cells": int(ntc.sum()),
        "n_genes": args.genes,
        "n_groups": args.groups,
        "effect_sd": args.effect_sd,
        "seed": args.seed,
        "counts_density": round(counts.nnz / np.prod(counts.shape), 4),
        "counts_npz_mb": round((inputs / "counts.npz").stat().st_size / MIB, 1),
        "simulate_seconds": round(t_sim, 2),
        "write_inputs_seconds": round(t_write, 2),
    }


def load_fitdata(workdir: Path, n_features: int | None):
    """Dense fit data (NTC cells x the first `n_features` features)."""
    with np.load(workdir / "fitdata.npz") as f:
        y, groups, sf = f["y"], f["groups"], f["sum_factor"]
    if n_features is not None:
        y = np.ascontiguousarray(y[:, :n_features])
    return y, groups, sf


def resolve_threads(requested: int | None, n_elements: int) -> int:
    """`--threads`, else the pipeline's own rule (tasks.resources.set_torch_threads)."""
    import torch

    if requested is None:
        from tasks.resources import set_torch_threads

        return set_torch_threads(None)  # the pipeline's default (n_elements no longer matters)
    torch.set_num_threads(requested)
    return requested


# ---------------------------------------------------------------------------------------
# BASELINE: a plain dense per-cell implementation of the SPEC's negbinom model
# ---------------------------------------------------------------------------------------
BASE_EPS = 1e-6  # SPEC epsilon for the empirical priors
BASE_LOG_EPS = 1e-8  # SPEC floor inside the NB logits


def baseline_keep(y: np.ndarray) -> np.ndarray:
    """SPEC filters for negbinom: drop zero-total and zero-sd features."""
    return (y.sum(axis=0) > 0) & (y.std(axis=0) > 0)


def baseline_priors(y: np.ndarray, groups: np.ndarray, sf: np.ndarray) -> dict[str, np.ndarray]:
    """mu_ntc ~ Gamma(m^2/s^2, m/s^2): m = baseline mean, s = robust SE floored at 10 % m."""
    yn = y.astype(np.float64) / sf[:, None].astype(np.float64)
    m = yn[groups == 0].mean(axis=0) + BASE_EPS
    med = np.median(yn, axis=0)
    rsd = 1.4826 * np.median(np.abs(yn - med), axis=0)
    rsd = np.where(rsd > BASE_EPS, rsd, yn.std(axis=0))
    s = rsd / math.sqrt(yn.shape[0]) + BASE_EPS
    s = np.maximum(s, 0.1 * m)
    return {"m": m, "s": s}


def baseline_init_effects(y: np.ndarray, groups: np.ndarray, sf: np.ndarray, n_groups: int):
    """log2(group mean / baseline mean) of size-factor-normalised counts, groups 1..C-1."""
    yn = y.astype(np.float64) / sf[:, None].astype(np.float64)
    means = np.stack([yn[groups == g].mean(axis=0) for g in range(n_groups)]) + BASE_LOG_EPS
    return np.log2(means[1:] / means[0])


def make_baseline(y: np.ndarray, groups: np.ndarray, sf: np.ndarray, n_groups: int):
    """(model, guide) for the dense baseline; the guide is a Pyro AutoNormal."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_median

    priors = baseline_priors(y, groups, sf)
    m = torch.as_tensor(priors["m"], dtype=torch.float32)
    s = torch.as_tensor(priors["s"], dtype=torch.float32)
    y_t = torch.as_tensor(y, dtype=torch.float32)
    g_t = torch.as_tensor(groups, dtype=torch.long)
    sf_t = torch.as_tensor(sf, dtype=torch.float32)
    n_cells, n_feat = y_t.shape

    def model():
        features = pyro.plate("features", n_feat, dim=-1)
        with features, pyro.plate("groups", n_groups - 1, dim=-2):
            log2_alpha = pyro.sample(
                "log2_alpha_y",
                dist.StudentT(torch.tensor(3.0), torch.tensor(0.0), torch.tensor(20.0)),
            )
        beta_o = pyro.sample("beta_o", dist.Gamma(torch.tensor(9.0), torch.tensor(3.0)))
        with features:
            o_y = pyro.sample("o_y", dist.Exponential(beta_o))
            mu_ntc = pyro.sample("mu_ntc", dist.Gamma(m**2 / s**2, m / s**2))
        phi = 1.0 / o_y**2
        log2_full = torch.cat([torch.zeros(1, n_feat), log2_alpha], dim=0)  # [C, T]
        alpha = torch.pow(2.0, log2_full)
        mu = mu_ntc * alpha[g_t] * sf_t[:, None]  # [N, T]
        logits = torch.log(mu + BASE_LOG_EPS) - torch.log(phi + BASE_LOG_EPS)
        with pyro.plate("cells", n_cells, dim=-2), features:
            pyro.sample("y", dist.NegativeBinomial(total_count=phi, logits=logits), obs=y_t)

    init_effects = torch.as_tensor(
        baseline_init_effects(y, groups, sf, n_groups), dtype=torch.float32
    )

    def init_loc(site):
        if site["name"] == "log2_alpha_y":
            return init_effects
        return init_to_median(site)

    guide = AutoNormal(model, init_loc_fn=init_loc)
    return model, guide


def baseline_optimizer(niters: int, lr: float):
    """SPEC optimiser: Adam, one-cycle schedule peaking at 10 x lr, clip norm 10."""
    import pyro
    import torch
    from torch.optim.lr_scheduler import OneCycleLR

    return pyro.optim.PyroLRScheduler(
        OneCycleLR,
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": lr},
            "max_lr": 10 * lr,
            "total_steps": niters,
        },
        clip_args={"clip_norm": 10.0},
    )


def run_baseline(y, groups, sf, n_groups: int, niters: int, lr: float, seed: int, stamps: list):
    """Run the baseline for `niters` steps; appends perf_counter after every step."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = make_baseline(y, groups, sf, n_groups)
    guide()  # build the parameters
    optim = baseline_optimizer(niters, lr)
    svi = SVI(model, guide, optim, loss=Trace_ELBO())
    losses = []
    for step in range(niters):
        losses.append(float(svi.step()))
        if step + 1 < niters:
            optim.step()
        stamps.append(time.perf_counter())
    return guide, np.asarray(losses)


# ---------------------------------------------------------------------------------------
# Worker: in-process SVI timing (ours or baseline), one fresh process each
# ---------------------------------------------------------------------------------------
def step_stats(stamps: list[float], warmup: int) -> dict[str, Any]:
    """ms per step after `warmup` steps, from per-step completion timestamps."""
    timed = np.diff(np.asarray(stamps[warmup - 1 :] if warmup > 0 else stamps)) * 1000.0
    if timed.size == 0:
        return {"ms_per_step_mean": None, "ms_per_step_median": None, "steps_timed": 0}
    return {
        "ms_per_step_mean": round(float(timed.mean()), 2),
        "ms_per_step_median": round(float(np.median(timed)), 2),
        "ms_per_step_min": round(float(timed.min()), 2),
        "ms_per_step_max": round(float(timed.max()), 2),
        "steps_timed": int(timed.size),
    }


def worker_svi(args: argparse.Namespace) -> dict[str, Any]:
    """Time SVI steps of `--impl` on the first `--worker-genes` features."""
    import torch

    workdir = Path(args.workdir)
    y, groups, sf = load_fitdata(workdir, args.worker_genes)
    threads = resolve_threads(args.threads, y.size)
    n_steps = args.warmup + args.steps_for_timing
    stamps: list[float] = []
    out: dict[str, Any] = {"impl": args.impl, "threads": threads}
    with RssSampler() as rss:
        rss_before = rss.now()
        t0 = time.perf_counter()
        if args.impl == "ours":
            from bayesdream_model.data import FitArrays
            from bayesdream_model.distributions import get_family
            from bayesdream_model.fit import FitOptions, fit_technical

            family = get_family("negbinom")
            data = FitArrays(y=y, groups=groups, n_groups=args.groups, sum_factor=sf)
            keep = family.flags(data).technical_correction_applied
            data = data.select_features(keep)
            options = FitOptions(niters=n_steps, lr=args.lr, tolerance=0.0, seed=args.seed)
            fitted = fit_technical(
                family, data, options, on_progress=lambda *_: stamps.append(time.perf_counter())
            )
            out["guide"] = fitted.guide_kind
            out["elbo"] = (
                "TraceMeanField_ELBO" if fitted.guide_kind == "mean_field" else "Trace_ELBO"
            )
            out["n_features_fit"] = data.n_features
            out["final_loss"] = float(fitted.svi.losses[-1])
        else:
            keep = baseline_keep(y)
            y = np.ascontiguousarray(y[:, keep])
            _, losses = run_baseline(
                y, groups, sf, args.groups, n_steps, args.lr, args.seed, stamps
            )
            out["guide"] = "AutoNormal"
            out["elbo"] = "Trace_ELBO"
            out["n_features_fit"] = int(keep.sum())
            out["final_loss"] = float(losses[-1])
        t1 = time.perf_counter()
    out.update(step_stats(stamps, args.warmup))
    out.update(
        {
            "n_cells": int(y.shape[0]),
            "n_latent": (args.groups + 1) * out["n_features_fit"],
            "steps_run": len(stamps),
            "warmup_steps": args.warmup,
            "setup_seconds": round((stamps[0] - t0) if stamps else float("nan"), 2),
            "total_seconds": round(t1 - t0, 2),
            "rss_before_fit_mb": round(rss_before, 1),
            "rss_peak_fit_mb": rss.peak(t0, t1),
            "ru_maxrss_mb": round(ru_maxrss_mb(), 1),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": load_average(),
        }
    )
    return out


# ---------------------------------------------------------------------------------------
# Worker: baseline recovery (a full-length fit of the baseline)
# ---------------------------------------------------------------------------------------
def worker_baseline_recovery(args: argparse.Namespace) -> dict[str, Any]:
    """Fit the baseline for `--niters` steps; recovery from its AutoNormal guide."""
    import torch

    workdir = Path(args.workdir)
    y, groups, sf = load_fitdata(workdir, None)
    threads = resolve_threads(args.threads, y.size)
    keep = baseline_keep(y)
    y = np.ascontiguousarray(y[:, keep])
    stamps: list[float] = []
    with RssSampler() as rss:
        t0 = time.perf_counter()
        guide, losses = run_baseline(
            y, groups, sf, args.groups, args.niters, args.lr, args.seed, stamps
        )
        t1 = time.perf_counter()
        with torch.no_grad():
            q = guide.quantiles([0.05, 0.5, 0.95])["log2_alpha_y"].numpy()  # [3, C-1, T]
            loc = guide.locs.log2_alpha_y.detach().numpy()
    with np.load(workdir / "truth.npz") as f:
        truth = f["log2_alpha"][1:, keep]
    out = recovery(loc, q[0], q[2], truth)
    out.update(
        {
            "threads": threads,
            "niters": args.niters,
            "fit_seconds": round(t1 - t0, 2),
            "final_loss": float(losses[-1]),
            "rss_peak_fit_mb": rss.peak(t0, t1),
            "ru_maxrss_mb": round(ru_maxrss_mb(), 1),
            "load_average_at_end": load_average(),
            "posterior": "AutoNormal guide: mean = loc, 90 % interval = loc +- 1.645 scale",
        }
    )
    return out


# ---------------------------------------------------------------------------------------
# Worker: the real Prefect flow end to end
# ---------------------------------------------------------------------------------------
def flow_config(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The run config (a mapping; paths absolute)."""
    inputs = workdir / "inputs"
    return {
        "store": str(workdir / "run.zarr"),
        "cells": str(inputs / "cells.csv"),
        "covariates": ["cell_line"],
        "sum_factor_col": "sum_factor",
        "modalities": {
            MODALITY: {
                "distribution": "negbinom",
                "counts": str(inputs / "counts.npz"),
                "features": str(inputs / "features.txt"),
                "cells": str(inputs / "cells.txt"),
            }
        },
        "fit": {
            "niters": args.niters,
            "nsamples": args.nsamples,
            "lr": args.lr,
            "seed": args.seed,
            "device": "cpu",
        },
    }


def _timed_task(original, label: str, records: list[dict[str, Any]]):
    """A Prefect task running `original`'s function, recording wall time and ru_maxrss."""
    from prefect import task

    @functools.wraps(original.fn)
    def timed(*a, **k):
        start = time.perf_counter()
        before = round(ru_maxrss_mb(), 1)
        try:
            return original.fn(*a, **k)
        finally:
            records.append(
                {
                    "stage": label,
                    "start": start,
                    "stop": time.perf_counter(),
                    "ru_maxrss_before_mb": before,
                    "ru_maxrss_after_mb": round(ru_maxrss_mb(), 1),
                }
            )

    return task(name=original.name)(timed)


def worker_flow(args: argparse.Namespace) -> dict[str, Any]:
    """Run `technical_fit` on the inputs; per-stage wall time and RSS peaks."""
    import torch

    import flows.technical_fit as ft

    workdir = Path(args.workdir)
    if args.threads is not None:  # override the pipeline's thread rule for this run only
        import tasks.fitting

        def fixed_threads(_n_elements: int, k: int = args.threads) -> int:
            torch.set_num_threads(k)
            return k

        tasks.fitting.set_torch_threads = fixed_threads
    records: list[dict[str, Any]] = []
    for name in FLOW_STAGES:  # the flow looks these up in its module at call time
        setattr(ft, name, _timed_task(getattr(ft, name), name, records))
    config = flow_config(args, workdir)
    with RssSampler() as rss:
        rss_start = rss.now()
        ru_start = ru_maxrss_mb()
        t0 = time.perf_counter()
        store = ft.technical_fit(config)
        t1 = time.perf_counter()
    stages = {}
    if records:  # flow start -> first task: Prefect's temporary server, flow-run creation
        stages["flow_startup"] = {
            "seconds": round(records[0]["start"] - t0, 2),
            "rss_peak_mb": rss.peak(t0, records[0]["start"]),
            "ru_maxrss_after_mb": records[0]["ru_maxrss_before_mb"],
        }
    for rec in records:
        stages[rec["stage"]] = {
            "seconds": round(rec["stop"] - rec["start"], 2),
            "rss_peak_mb": rss.peak(rec["start"], rec["stop"]),
            "ru_maxrss_after_mb": rec["ru_maxrss_after_mb"],
        }
    import zarr

    root = zarr.open_group(store, mode="r")
    res = root[f"technical/{MODALITY}"].attrs
    fit_attrs = root[f"fit/{MODALITY}"].attrs
    return {
        "store": store,
        "flow_call_seconds": round(t1 - t0, 2),
        "tasks_seconds_sum": round(sum(r["stop"] - r["start"] for r in records), 2),
        "stages": stages,
        "store_fit_seconds": round(float(res["fit_seconds"]), 2),
        "store_sampling_seconds": round(float(res["sampling_seconds"]), 2),
        "sampling_batch_size": int(res["sampling_batch_size"]),
        "guide": res["guide"],
        "niters_run": int(res["niters_run"]),
        "stop_reason": res["stop_reason"],
        "fit_device": fit_attrs["device"],
        "torch_threads_after_fit": torch.get_num_threads(),
        "rss_at_flow_start_mb": round(rss_start, 1),
        "ru_maxrss_at_flow_start_mb": round(ru_start, 1),
        "rss_peak_flow_mb": rss.peak(t0, t1),
        "ru_maxrss_mb": round(ru_maxrss_mb(), 1),
        "load_average_at_end": load_average(),
    }


# ---------------------------------------------------------------------------------------
# Recovery vs truth
# ---------------------------------------------------------------------------------------
def recovery(mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, truth: np.ndarray) -> dict:
    """Correlation, RMSE and 90 % interval coverage of the log2 effects (all groups >= 1)."""
    m, t = mean.ravel(), truth.ravel()
    return {
        "n_effects": int(t.size),
        "corr_log2_alpha": round(float(np.corrcoef(m, t)[0, 1]), 4),
        "rmse_log2_alpha": round(float(np.sqrt(np.mean((m - t) ** 2))), 4),
        "coverage90_log2_alpha": round(float(np.mean((lo.ravel() <= t) & (t <= hi.ravel()))), 4),
        "mean_interval_width90": round(float(np.mean(hi - lo)), 4),
    }


def pipeline_recovery(store: str, workdir: Path) -> dict[str, Any]:
    """Recovery from the store's posterior draws (fit features only)."""
    import zarr

    group = zarr.open_group(store, mode="r")[f"technical/{MODALITY}"]
    names = np.asarray(group["feature_names"][...], dtype=object).astype(str)
    fit = np.asarray(group["technical_correction_applied"][...], dtype=bool)
    draws = np.asarray(group["alpha_y_add"][...], dtype=np.float64)[:, 1:, :]  # [S, C-1, T]
    with np.load(workdir / "truth.npz") as f:
        truth_names = f["feature_names"].astype(str)
        truth = f["log2_alpha"][1:]
        mu_true = f["mu"]
    order = {n: i for i, n in enumerate(truth_names)}
    idx = np.asarray([order[n] for n in names])[fit]
    draws = draws[:, :, fit]
    lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
    out = recovery(draws.mean(axis=0), lo, hi, truth[:, idx])
    mu = np.asarray(group["mu_ntc"][...], dtype=np.float64)[:, fit].mean(axis=0)
    out["corr_log_mu_ntc"] = round(float(np.corrcoef(np.log(mu), np.log(mu_true[idx]))[0, 1]), 4)
    out["n_samples"] = int(draws.shape[0])
    out["n_features_fit"] = int(fit.sum())
    out["posterior"] = "sample mean; 90 % interval = 5 %-95 % sample quantiles"
    return out


# ---------------------------------------------------------------------------------------
# Parent: orchestration, table, JSON
# ---------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, workdir: Path, mode: str, extra: list[str]) -> dict:
    """Run this script in `--worker mode` in a fresh process; returns its JSON result."""
    result = workdir / f"result_{mode}_{len(list(workdir.glob('result_*.json')))}.json"
    log = result.with_suffix(".log")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--workdir",
        str(workdir),
        "--worker-out",
        str(result),
        "--cells",
        str(args.cells),
        "--genes",
        str(args.genes),
        "--groups",
        str(args.groups),
        "--niters",
        str(args.niters),
        "--nsamples",
        str(args.nsamples),
        "--steps-for-timing",
        str(args.steps_for_timing),
        "--warmup",
        str(args.warmup),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        *extra,
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(workdir / "prefect_home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    print(f"  running worker {mode} {' '.join(extra)} (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"worker {mode} {extra} failed (rc {proc.returncode}):\n{tail}")
    data = json.loads(result.read_text())
    data["process_wall_seconds"] = round(wall, 2)
    return data


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, None when either is missing."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def fmt(value: Any, unit: str = "") -> str:
    """A table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    """A two-column block."""
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)))
    width = max(len(k) for k, _ in rows) if rows else 0
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def svi_section(args, workdir, report) -> None:
    """Sections 1 and 2: ms per step, ours vs baseline."""
    svi: dict[str, Any] = {}
    common = ["--worker-genes", str(args.genes)]
    svi["ours_default"] = run_worker(args, workdir, "svi", ["--impl", "ours", *common])
    svi["baseline"] = run_worker(args, workdir, "svi", ["--impl", "baseline", *common])
    if args.iaf:
        small = ["--worker-genes", str(args.iaf_genes)]
        svi["ours_iaf_small"] = run_worker(args, workdir, "svi", ["--impl", "ours", *small])
        svi["baseline_iaf_small"] = run_worker(args, workdir, "svi", ["--impl", "baseline", *small])
    report["svi_step"] = svi
    pairs = [("ours_default", "baseline")]
    if args.iaf:
        pairs.append(("ours_iaf_small", "baseline_iaf_small"))
    report["ratios_ours_over_baseline"] = {
        f"{ours}/{base}": {
            "ms_per_step_median": ratio(
                svi[ours]["ms_per_step_median"], svi[base]["ms_per_step_median"]
            ),
            "ms_per_step_mean": ratio(svi[ours]["ms_per_step_mean"], svi[base]["ms_per_step_mean"]),
            "rss_peak_fit": ratio(svi[ours]["rss_peak_fit_mb"], svi[base]["rss_peak_fit_mb"]),
            "ru_maxrss": ratio(svi[ours]["ru_maxrss_mb"], svi[base]["ru_maxrss_mb"]),
        }
        for ours, base in pairs
    }


def print_report(report: dict[str, Any]) -> None:
    """The human-readable table."""
    m, d = report["machine"], report["data"]
    print_table(
        "machine",
        [
            ("cpu", f"{m['cpu_model']} ({m['cpu_count']} cpus, affinity {m['cpu_affinity']})"),
            ("ram", f"{m['ram_total_gb']} GB total, {m['ram_available_gb_at_start']} GB available"),
            ("torch / pyro", f"{m['torch_version']} / {m['pyro_version']}"),
            ("torch threads (default)", m["torch_default_threads"]),
            ("load average start", m["load_average_at_start"]),
            ("load average end", report.get("load_average_at_end")),
            ("git commit", m["git_commit"]),
        ],
    )
    print_table(
        "data",
        [
            (
                "screen",
                f"{d['n_ntc_cells']} NTC cells x {d['n_genes']} genes, {d['n_groups']} groups",
            ),
            ("inputs", d["format"]),
            ("counts density / npz size", f"{d['counts_density']} / {d['counts_npz_mb']} MB"),
        ],
    )
    svi = report.get("svi_step")
    if svi:
        rows = []
        for key, r in svi.items():
            rows.append(
                (
                    key,
                    f"{r['n_cells']}x{r['n_features_fit']} {r['guide']:<10} {r['elbo']:<19} "
                    f"median {fmt(r['ms_per_step_median'])} ms  "
                    f"mean {fmt(r['ms_per_step_mean'])} ms"
                    f"  (n={r['steps_timed']}, thr={r['threads']})  "
                    f"peakRSS {fmt(r['rss_peak_fit_mb'])} MB  "
                    f"ru_maxrss {fmt(r['ru_maxrss_mb'])} MB",
                )
            )
        for key, r in report["ratios_ours_over_baseline"].items():
            if "ms_per_step_median" not in r:
                continue
            rows.append(
                (
                    f"ratio {key}",
                    f"ms/step median {fmt(r['ms_per_step_median'])}  "
                    f"mean {fmt(r['ms_per_step_mean'])}"
                    f"  peak RSS {fmt(r['rss_peak_fit'])}  ru_maxrss {fmt(r['ru_maxrss'])}",
                )
            )
        print_table("1-2. SVI step time: ours vs dense baseline (each in a fresh process)", rows)
    flow = report.get("pipeline")
    if flow:
        rows = [
            (
                f"stage {name}",
                f"{fmt(s['seconds'], ' s'):>10}   peak RSS {fmt(s['rss_peak_mb'], ' MB'):>11}"
                f"   ru_maxrss after {fmt(s['ru_maxrss_after_mb'], ' MB')}",
            )
            for name, s in flow["stages"].items()
        ]
        rows += [
            ("store fit_seconds", fmt(flow["store_fit_seconds"], " s")),
            ("store sampling_seconds", fmt(flow["store_sampling_seconds"], " s")),
            ("fit ms/step (store)", fmt(flow["fit_ms_per_step"], " ms")),
            (
                "guide / niters / stop",
                f"{flow['guide']} / {flow['niters_run']} / {flow['stop_reason']}",
            ),
            ("sampling batch size", flow["sampling_batch_size"]),
            ("torch threads (pipeline)", flow["torch_threads_after_fit"]),
            ("flow call wall", fmt(flow["flow_call_seconds"], " s")),
            ("process wall (incl. imports)", fmt(flow["process_wall_seconds"], " s")),
            (
                "peak RSS (sampled) / ru_maxrss",
                f"{fmt(flow['rss_peak_flow_mb'])} / {fmt(flow['ru_maxrss_mb'])} MB",
            ),
        ]
        print_table("3. Pipeline end to end (technical_fit flow, fresh process)", rows)
    rec = report.get("recovery")
    if rec:
        rows = []
        for key, r in rec.items():
            rows.append(
                (
                    key,
                    f"corr {fmt(r['corr_log2_alpha'])}  RMSE {fmt(r['rmse_log2_alpha'])}  "
                    f"cover90 {fmt(r['coverage90_log2_alpha'])}  width90 "
                    f"{fmt(r['mean_interval_width90'])}  (n={r['n_effects']})",
                )
            )
        print_table("4. Recovery of log2 effects vs truth", rows)
    print(f"\n  total benchmark wall: {fmt(report['total_seconds'], ' s')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=4000, help="NTC cells (default 4000)")
    p.add_argument("--genes", type=int, default=3000, help="genes (default 3000)")
    p.add_argument("--groups", type=int, default=3, help="technical groups C (default 3)")
    p.add_argument("--niters", type=int, default=2000, help="pipeline fit.niters (default 2000)")
    p.add_argument("--nsamples", type=int, default=1000, help="posterior draws (default 1000)")
    p.add_argument("--steps-for-timing", type=int, default=20, help="timed SVI steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed SVI steps first (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--effect-sd", type=float, default=0.5, help="sd of simulated log2 effects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the in-process timings and the flow (default: the pipeline's "
        "own rule, tasks.resources.set_torch_threads)",
    )
    p.add_argument("--iaf", action="store_true", help="also time the IAF guide on --iaf-genes")
    p.add_argument(
        "--iaf-genes",
        type=int,
        default=1000,
        help="T for the IAF timing; n_latent=(C+1)T must be <= 5000 (default 1000)",
    )
    p.add_argument(
        "--baseline-recovery",
        action="store_true",
        help="also fit the baseline for --niters steps and report its recovery",
    )
    p.add_argument("--skip-svi", action="store_true", help="skip sections 1-2")
    p.add_argument("--skip-flow", action="store_true", help="skip sections 3-4")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output ({DEFAULT_OUT})")
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs/store here")
    # worker mode (internal)
    p.add_argument("--worker", choices=["svi", "flow", "baseline_recovery"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-genes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parent: simulate, run the workers, print and write the report."""
    args = parse_args(argv)
    if args.worker:
        modes = {
            "svi": worker_svi,
            "flow": worker_flow,
            "baseline_recovery": worker_baseline_recovery,
        }
        result = modes[args.worker](args)
        args.worker_out.write_text(json.dumps(result, indent=2, default=str))
        return 0
    if args.iaf and (args.groups + 1) * args.iaf_genes > 5000:
        raise SystemExit(f"--iaf-genes {args.iaf_genes}: (C+1)T must be <= 5000 for the CPU IAF")
    started = time.perf_counter()
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_negbinom_")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "negbinom technical fit",
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if not k.startswith("worker") and k != "impl"
        },
        "machine": machine_description(),
    }
    print(f"workdir: {workdir}", flush=True)
    try:
        report["data"] = write_inputs(args, workdir)
        print(f"inputs written ({report['data']['write_inputs_seconds']} s)", flush=True)
        if not args.skip_svi:
            svi_section(args, workdir, report)
            print("SVI timings done", flush=True)
        if not args.skip_flow:
            flow = run_worker(args, workdir, "flow", [])
            flow["fit_ms_per_step"] = round(
                1000 * flow["store_fit_seconds"] / flow["niters_run"], 2
            )
            report["pipeline"] = flow
            print("pipeline done", flush=True)
            report["recovery"] = {"pipeline": pipeline_recovery(flow["store"], workdir)}
        if args.baseline_recovery:
            base = run_worker(args, workdir, "baseline_recovery", [])
            report.setdefault("recovery", {})["baseline_dense"] = base
            if "pipeline" in report:
                report["ratios_ours_over_baseline"] = report.get("ratios_ours_over_baseline", {})
                report["ratios_ours_over_baseline"]["pipeline_fit/baseline_recovery_fit"] = {
                    "fit_seconds": ratio(
                        report["pipeline"]["store_fit_seconds"], base["fit_seconds"]
                    ),
                    "rss_peak_fit": ratio(
                        report["pipeline"]["stages"]["fit"]["rss_peak_mb"], base["rss_peak_fit_mb"]
                    ),
                }
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_at_end"] = load_average()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"  JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
