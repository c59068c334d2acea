"""Benchmark: the default negbinom technical fit on a GPU (or any torch device), model only.

No Prefect and no store: each screen is simulated in memory, fit with `fit_technical`
under the default options (`auto` guide, so the per-feature guide; Laplace start; the
default stop rule), sampled (1,000 draws under the device's sampling plan, as the
pipeline plans them) and scored against its truth. The pipeline's CPU figures for the
same screens, through the whole flow, are in results/peer_negbinom*.json,
genome_negbinom.json and large_screen_nb.json.

Screens (negbinom, 3 cell lines, log2 effects N(0, 0.5) for lines 2 and 3):
- `benchmark` / `deep` / `droplet`: 4,000 NTC cells x 3,000 genes, median mean 5 / 50 /
  0.08 (`simulate_negbinom_screen`, seed 0: the peer benchmark's cells);
- `genome`: 20,000 x 20,000, median mean 0.08 (as results/genome_negbinom.json);
- `large`: the 200,000-cell screen's 80,000 NTC cells x 30,000 genes (~9 % non-zero),
  drawn by `screen_writer.Screen` (`--model nb`, seed 0: the large-screen benchmark's
  data) gene block by gene block in worker processes, straight into the sparse fit
  matrix (`--large-scale` shrinks cells and genes for a quick run).

Per screen: wall per stage (simulate, fit, sample, score), the fit's Laplace start and
SVI seconds, steps and why it stopped, ms/step, peak RSS, peak GPU memory, and the
correlation / RMSE / 90 % coverage of the posterior alpha_y_add[:, 1:].

Run:  python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu_negbinom.json   # GPU
      .venv/bin/python benchmarks/bench_gpu.py --device cpu --screens benchmark,large \\
          --large-scale 0.1 --out /tmp/gpu_check.json                               # check
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from calibration import interval_recovery  # noqa: E402
from machine import RssSampler, cpu_model, load_average, mb  # noqa: E402
from screen_writer import Screen  # noqa: E402

from bayesdream_model.data import FitArrays  # noqa: E402
from bayesdream_model.distributions import get_family  # noqa: E402
from bayesdream_model.fit import FitOptions, fit_technical  # noqa: E402
from bayesdream_model.memory import plan_sampling  # noqa: E402
from bayesdream_model.posterior import posterior_batches  # noqa: E402
from bayesdream_model.simulate import simulate_negbinom_screen  # noqa: E402
from bayesdream_model.sparse import SparseCounts  # noqa: E402
from tasks.resources import sampling_budget  # noqa: E402

log = logging.getLogger("bench_gpu")
SMALL = {"benchmark": 5.0, "deep": 50.0, "droplet": 0.08}
SCREENS = (*SMALL, "genome", "large")

_LARGE: Screen | None = None  # the large screen's parameters, shared with forked workers
_NTC_INDEX: np.ndarray | None = None  # matrix column -> NTC row (-1: not an NTC cell)


# ---------------------------------------------------------------------------------------
# Screens
# ---------------------------------------------------------------------------------------
def small_screen(mu_median: float, n_cells: int, n_features: int) -> dict[str, Any]:
    """A dense negbinom screen of `simulate_negbinom_screen` (every cell an NTC)."""
    s = simulate_negbinom_screen(
        n_cells=n_cells, n_features=n_features, n_groups=3, mu_median=mu_median, seed=0
    )
    data = FitArrays(
        y=np.ascontiguousarray(s.counts.T, dtype=np.float32),
        groups=s.groups,
        n_groups=3,
        sum_factor=s.sum_factor,
    )
    return {"data": data, "effects": s.log2_alpha}


def _large_block(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block b of the large screen restricted to its NTC cells: (nnz per gene, NTC rows,
    counts), as the large-screen benchmark's npz holds it."""
    counts, columns, values = _LARGE.block(b, values=True)
    rows = _NTC_INDEX[columns]
    keep = rows >= 0
    gene = np.repeat(np.arange(counts.size), counts)
    per_gene = np.bincount(gene[keep], minlength=counts.size).astype(np.int64)
    return per_gene, rows[keep].astype(np.int32), values[keep].astype(np.float32)


def large_screen(scale: float, workers: int) -> dict[str, Any]:
    """The large-screen benchmark's NTC cells as a sparse fit matrix (features with no NTC
    count dropped, as the pipeline's filters drop them)."""
    global _LARGE, _NTC_INDEX
    args = argparse.Namespace(
        cells=round(200_000 * scale), ntc=round(80_000 * scale), genes=round(30_000 * scale),
        density=0.10, zero_genes=0.005, targets=2000, dtype="int32", shuffle_cells=False,
        gen_block=256, seed=0, model="nb",
    )  # fmt: skip
    _LARGE = Screen(args)
    is_ntc = _LARGE.targets == "ntc"  # table order = matrix order (no shuffle)
    _NTC_INDEX = np.where(is_ntc, np.cumsum(is_ntc) - 1, -1)
    # forked workers inherit the screen's parameters; they run numpy only (no torch, no CUDA)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        blocks = list(pool.map(_large_block, range(_LARGE.n_blocks)))
    per_gene = np.concatenate([b[0] for b in blocks])
    indptr = np.r_[0, np.cumsum(per_gene)].astype(np.int64)
    y = SparseCounts(
        indptr=indptr,
        rows=np.concatenate([b[1] for b in blocks]),
        values=np.concatenate([b[2] for b in blocks]),
        n_rows=int(is_ntc.sum()),
    )
    keep = np.flatnonzero(per_gene > 0)
    data = FitArrays(
        y=y, groups=_LARGE.line_code[is_ntc], n_groups=3, sum_factor=_LARGE.sum_factor[is_ntc]
    ).select_features(keep)
    return {
        "data": data,
        "effects": _LARGE.effects[:, keep],
        "dropped_features": int(args.genes - keep.size),
    }


def make_screen(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name in SMALL:
        return small_screen(SMALL[name], 4000, 3000)
    if name == "genome":
        return small_screen(0.08, 20_000, 20_000)
    return large_screen(args.large_scale, args.workers)


# ---------------------------------------------------------------------------------------
# One screen: simulate, fit, sample, score
# ---------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_screen(name: str, args: argparse.Namespace) -> dict[str, Any]:
    walls: dict[str, float] = {}
    rss = RssSampler(interval=0.05)
    with rss:
        t0 = time.perf_counter()
        screen = make_screen(name, args)
        data: FitArrays = screen["data"]
        walls["simulate"] = time.perf_counter() - t0
        nnz = data.y.nnz if isinstance(data.y, SparseCounts) else int(np.count_nonzero(data.y))
        log.info("%s: %d cells x %d features, %.1f %% non-zero (%.0f s)", name,
                 data.n_cells, data.n_features, 100 * nnz / (data.n_cells * data.n_features),
                 walls["simulate"])  # fmt: skip
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_fit = time.perf_counter()
        fitted = fit_technical(get_family("negbinom"), data, FitOptions(device=args.device))
        sync(args.device)
        walls["fit"] = time.perf_counter() - t_fit
        svi = fitted.svi
        log.info(
            "%s: fit %.1f s, %d steps (%s)", name, walls["fit"], svi.niters_run, svi.stop_reason
        )
        t_s = time.perf_counter()
        shape = (data.n_cells, data.n_features, data.n_groups)
        budget = sampling_budget(args.device)  # the pipeline's: free VRAM on a GPU
        plan = plan_sampling(nsamples=args.nsamples, shape=shape, budget=budget)
        draws = np.empty((args.nsamples, data.n_groups - 1, data.n_features), dtype=np.float32)
        for start, stop, results in posterior_batches(fitted, plan, seed=0):
            draws[start:stop] = results["alpha_y_add"][:, 1:]
        walls["sample"] = time.perf_counter() - t_s
        t_r = time.perf_counter()
        recovery = interval_recovery(draws, screen["effects"][1:])
        walls["score"] = time.perf_counter() - t_r
    laplace = (svi.start or {}).get("seconds")
    return {
        "screen": name,
        "shape": [data.n_cells, data.n_features],
        "nonzero_fraction": round(nnz / (data.n_cells * data.n_features), 4),
        "dropped_features": screen.get("dropped_features", 0),
        "wall_s": {k: round(v, 2) for k, v in walls.items()},
        "fit": {
            "guide": fitted.guide_kind,
            "laplace_s": None if laplace is None else round(laplace, 2),
            "svi_s": round(svi.seconds, 2),
            "statistics_and_priors_s": round(walls["fit"] - svi.seconds - (laplace or 0.0), 2),
            "steps": svi.niters_run,
            "ms_per_step": round(1000 * svi.seconds / max(svi.niters_run, 1), 2),
            "stop_reason": svi.stop_reason,
        },
        "sampling": {
            "nsamples": args.nsamples,
            "batch": plan.batch_size,
            "batches": plan.n_batches,
        },
        "peak_rss_mb": mb(rss.peak()),
        "peak_gpu_mb": mb(torch.cuda.max_memory_allocated()) if args.device == "cuda" else None,
        "recovery": recovery,
    }


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1e9, 1)}
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--screens", default=",".join(SCREENS), help=f"comma list of {SCREENS}")
    p.add_argument("--nsamples", type=int, default=1000)
    p.add_argument("--large-scale", type=float, default=1.0, help="cells and genes x this")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.screens = [s for s in args.screens.split(",") if s]
    unknown = sorted(set(args.screens) - set(SCREENS))
    if unknown:
        p.error(f"unknown screens {unknown}; choose from {SCREENS}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bayesdream_model").setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"benchmark": "negbinom fit on one device, model only", "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
    }, "machine": machine(args.device), "rows": []}  # fmt: skip
    t0 = time.perf_counter()
    for name in args.screens:
        row = run_screen(name, args)
        report["rows"].append(row)
        r, f = row["recovery"], row["fit"]
        print(f"{name:>9} {row['shape'][0]:>6} x {row['shape'][1]:<6} fit {row['wall_s']['fit']:7.1f} s"
              f" ({f['steps']} steps, {f['ms_per_step']} ms/step, Laplace {f['laplace_s']} s)"
              f"  sample {row['wall_s']['sample']:6.1f} s  corr {r['correlation']:.4f}"
              f"  rmse {r['rmse']:.4f}  cov90 {r['coverage90']:.3f}"
              f"  rss {row['peak_rss_mb']} MB  gpu {row['peak_gpu_mb']} MB", flush=True)  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # after each: a kill keeps some
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(math.isfinite(r["recovery"]["rmse"]) for r in report["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
