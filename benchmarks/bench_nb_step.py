"""Per-step cost of the negbinom likelihood: the fused dense pass (before issue 11) vs the
split one (tabulated size-factor term + one pass over the non-zeros), at 10 % density.

For each size (default 4,000 x 3,000 and 20,000 x 20,000 cells x features, 3 groups) and
each implementation it reports, every measurement in a fresh subprocess (so that its peak
RSS is its own):

- `likelihood`: ms per forward + backward of the likelihood alone (the value the family
  adds to the model and its gradients w.r.t. mu_ntc, o_y, log2_alpha_y), median and min
  over `--reps`, after one untimed call; the seconds to build the statistics; peak RSS.
- `svi`: ms per full SVI step of `bayesdream_model.fit.fit_technical` with the
  feature_mvn guide (priors, guide, ELBO, Adam, clipping as in a fit), median over
  `--steps` steps after `--warmup`; peak RSS. The fused run uses the same family with its
  `tensors` / `observe` swapped for `benchmarks/nb_fused.py`, on the dense matrix; the
  split run holds the matrix as its non-zeros (`SparseCounts`), as the fit step now does.

Both see the same counts: features drawn in blocks, a cell non-zero with probability
`--density`, values 1 + Poisson(lambda_t), lambda_t log-normal; size factors log-normal.
Ratios are fused / split. Timings on a shared machine are noisy: compare medians taken
under similar load (the load average is recorded around each run).

Run:  .venv/bin/python benchmarks/bench_nb_step.py [--sizes 4000x3000 20000x20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from machine import load_average, mb, ru_maxrss_bytes  # noqa: E402

DEFAULT_OUT = HERE / "results" / "nb_step.json"
IMPLS = ("fused", "split")
KINDS = ("likelihood", "svi")
TARGET_RATIO = 5.0  # issue 11: >= 5x cheaper per step at 10 % density
BLOCK = 512  # features drawn per block


# -- the data ------------------------------------------------------------------------------
def count_blocks(n_cells: int, n_features: int, density: float, seed: int):
    """Dense float32 blocks [N, <= BLOCK] of the counts, in feature order (same for both)."""
    rng = np.random.default_rng([seed, n_cells, n_features])
    lam = rng.lognormal(0.0, 1.0, n_features)
    for start in range(0, n_features, BLOCK):
        width = min(BLOCK, n_features - start)
        hit = rng.random((n_cells, width)) < density
        values = 1.0 + rng.poisson(lam[start : start + width], (n_cells, width))
        yield (hit * values).astype(np.float32)


def fit_arrays(args: argparse.Namespace, impl: str):
    """The screen as `FitArrays`: dense [N, T] float32 (fused) or `SparseCounts` (split)."""
    from bayesdream_model.data import FitArrays
    from bayesdream_model.sparse import SparseCounts

    n, t = args.cells, args.features
    blocks = count_blocks(n, t, args.density, args.seed)
    if impl == "split":
        y = SparseCounts.from_blocks(blocks, n_rows=n)
    else:
        y = np.empty((n, t), dtype=np.float32)
        for k, block in enumerate(blocks):
            y[:, k * BLOCK : k * BLOCK + block.shape[1]] = block
    rng = np.random.default_rng([args.seed, 1])
    groups = rng.integers(0, args.groups, n)
    groups[: args.groups] = np.arange(args.groups)
    sf = rng.lognormal(0.0, 0.5, n).astype(np.float32)
    return FitArrays(y=y, groups=groups, n_groups=args.groups, sum_factor=sf)


def use_fused(family) -> None:
    """The family's likelihood swapped for the pre-issue-11 fused pass (this process only)."""
    import nb_fused
    import pyro

    from bayesdream_model.constants import OBS_SITE
    from bayesdream_model.data import FitTensors

    def tensors(data, device):
        stats = nb_fused.fused_statistics(data, device)
        return FitTensors(
            y=stats["y"][:0], groups=stats["bounds"][:0], n_groups=data.n_groups, stats=stats
        )

    def observe(params, data, plates):
        pyro.factor(OBS_SITE, nb_fused.fused_log_likelihood(params, data.stats))

    family.tensors, family.observe = tensors, observe


# -- the worker: one measurement ---------------------------------------------------------
def worker_likelihood(args: argparse.Namespace) -> dict[str, Any]:
    """ms per forward + backward of the likelihood of one implementation."""
    import nb_fused
    import torch

    from bayesdream_model.distributions.negbinom import nb_log_likelihood, nb_statistics

    data = fit_arrays(args, args.impl)
    t0 = time.perf_counter()
    if args.impl == "split":
        stats, fn = nb_statistics(data, "cpu"), nb_log_likelihood
    else:
        stats, fn = nb_fused.fused_statistics(data, "cpu"), nb_fused.fused_log_likelihood
    build = time.perf_counter() - t0
    rng = np.random.default_rng([args.seed, 2])
    t, c = args.features, args.groups
    values = {
        "mu_ntc": rng.lognormal(0.0, 1.0, t),
        "o_y": rng.uniform(0.2, 1.5, t),
        "log2_alpha_y": rng.normal(0.0, 0.5, (c - 1, t)),
    }
    params = {
        k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in values.items()
    }
    leaves = list(params.values())
    times = []
    for rep in range(args.reps + 1):
        start = time.perf_counter()
        torch.autograd.grad(fn(params, stats), leaves)
        if rep:  # the first call is untimed
            times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return {
        "ms_median": round(float(np.median(ms)), 2),
        "ms_min": round(float(ms.min()), 2),
        "stats_seconds": round(build, 2),
        "nonzero": int(np.count_nonzero(data.y)) if args.impl == "fused" else data.y.nnz,
    }


def worker_svi(args: argparse.Namespace) -> dict[str, Any]:
    """ms per full SVI step (feature_mvn guide) of one implementation."""
    from bayesdream_model.distributions import get_family
    from bayesdream_model.fit import FitOptions, fit_technical

    data = fit_arrays(args, args.impl)
    family = get_family("negbinom")
    if args.impl == "fused":
        use_fused(family)
    stamps: list[float] = []
    # init "prior": the step alone is timed (the Laplace start is a stage of its own)
    options = FitOptions(
        niters=args.warmup + args.steps, seed=args.seed, guide="feature_mvn", init="prior"
    )
    t0 = time.perf_counter()
    fit_technical(family, data, options, on_progress=lambda *_: stamps.append(time.perf_counter()))
    ms = np.diff(np.asarray(stamps[args.warmup - 1 :])) * 1e3
    return {
        "ms_median": round(float(np.median(ms)), 2),
        "ms_min": round(float(ms.min()), 2),
        "setup_and_first_step_seconds": round(stamps[0] - t0, 2),
    }


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, with what it ran on."""
    import torch

    torch.set_num_threads(args.threads)
    before = load_average()
    result = worker_likelihood(args) if args.kind == "likelihood" else worker_svi(args)
    return {
        **result,
        "peak_rss_mb": mb(ru_maxrss_bytes()),
        "threads": torch.get_num_threads(),
        "load_average": [before, load_average()],
    }


# -- the parent: subprocesses, the table, the JSON ---------------------------------------
def run(args: argparse.Namespace, size: tuple[int, int], impl: str, kind: str) -> dict[str, Any]:
    """One measurement in a fresh subprocess (its own peak RSS), within --timeout."""
    cells, features = size
    command = [
        sys.executable, __file__, "--worker", "--impl", impl, "--kind", kind,
        "--cells", str(cells), "--features", str(features), "--groups", str(args.groups),
        "--density", str(args.density), "--reps", str(args.reps), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.timeout} s"}
    if out.returncode != 0:
        return {"status": f"failed ({out.returncode})", "log_tail": out.stderr[-2000:]}
    return {"status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every size x kind, the two implementations alternated `--rounds` times."""
    rows = []
    for size in args.sizes:
        for kind in args.kinds:
            runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
            for _ in range(args.rounds):
                for impl in IMPLS:
                    runs[impl].append(run(args, size, impl, kind))
                    print(f"{size[0]}x{size[1]} {kind:10s} {impl:6s} {runs[impl][-1]}", flush=True)
            rows.append(summarise(size, kind, runs))
    return rows


def summarise(size: tuple[int, int], kind: str, runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Median over the rounds of each implementation's median ms, and the ratio."""
    row: dict[str, Any] = {"cells": size[0], "features": size[1], "kind": kind, "runs": runs}
    for impl, results in runs.items():
        ok = [r for r in results if r["status"] == "ok"]
        row[f"{impl}_ms"] = float(np.median([r["ms_median"] for r in ok])) if ok else None
        row[f"{impl}_peak_rss_mb"] = max((r["peak_rss_mb"] for r in ok), default=None)
    if row["fused_ms"] and row["split_ms"]:
        row["ratio"] = round(row["fused_ms"] / row["split_ms"], 2)
        row["meets_target"] = row["ratio"] >= TARGET_RATIO
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The summary, one line per size and kind."""
    lines = [f"{'size':>12s} {'kind':10s} {'fused ms':>10s} {'split ms':>10s} {'ratio':>6s} "
             f"{'fused RSS MB':>12s} {'split RSS MB':>12s}"]  # fmt: skip
    for r in rows:
        lines.append(
            f"{r['cells']:>6d}x{r['features']:<5d} {r['kind']:10s} {r['fused_ms'] or 0:10.1f} "
            f"{r['split_ms'] or 0:10.1f} {r.get('ratio', 0):6.2f} "
            f"{r['fused_peak_rss_mb'] or 0:12.1f} {r['split_peak_rss_mb'] or 0:12.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; `--worker` runs one measurement and prints its JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["4000x3000", "20000x20000"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=7, help="timed likelihood calls")
    p.add_argument("--steps", type=int, default=10, help="timed SVI steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed SVI steps")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two impls")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    p.add_argument("--features", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from bench_distributions import machine_description

    machine = machine_description()
    rows = measure(args)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("worker", "impl", "kind", "cells", "features")
    }
    settings["out"] = str(settings["out"])
    result = {
        "benchmark": "negbinom likelihood per step: fused dense pass vs split (non-zeros only)",
        "args": settings,
        "machine": machine,
        "target_ratio": TARGET_RATIO,
        "rows": rows,
        "load_average_at_end": load_average(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
