"""The multinomial baseline prior: 90 % coverage of the effects under each choice.

    python benchmarks/bench_priors.py [--out benchmarks/results/priors.json]

Held-out multinomial screens (K = 4 categories, 3 groups) at two sizes; each fitted with
the default guide and stop rule under `multinomial_baseline_prior: flat` (Dirichlet(1),
the default) and `baseline_counts` (Dirichlet(baseline counts + 1), the reference
bayesDREAM's), each in a fresh process with one torch thread. Printed per run:
coverage of the centred logit effects' 90 % intervals, correlation, RMSE, steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from calibration import interval_recovery
from machine import cpu_model, load_average, mb, ru_maxrss_bytes

HERE = Path(__file__).resolve().parent
SIZES = [(100, 1000, 9201), (400, 3000, 9202)]  # (features, cells, seed)
PRIORS = ("flat", "baseline_counts")
NSAMPLES = 400


def run_one(features: int, cells: int, seed: int, prior: str) -> dict:
    """One fit (in a fresh child): recovery of the known centred logit effects."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from bayesdream_model.data import FitArrays
    from bayesdream_model.distributions import PriorOptions, get_family
    from bayesdream_model.fit import FitOptions, fit_technical
    from bayesdream_model.memory import SamplingPlan
    from bayesdream_model.posterior import posterior_batches
    from bayesdream_model.simulate import simulate_multinomial

    screen = simulate_multinomial(n_cells=cells, n_features=features, n_groups=3, seed=seed)
    y = np.swapaxes(screen.y, 0, 1).astype(np.float32)  # [N, T, K]
    family = get_family("multinomial").configured(PriorOptions(multinomial_baseline=prior))
    keep = ~family.flags(FitArrays(y, screen.groups, 3)).ntc_excluded_from_fit
    data = FitArrays(y[:, keep], screen.groups, 3)
    fitted = fit_technical(family, data, FitOptions())
    plan = SamplingPlan(NSAMPLES, 100, True, 0, "benchmark")
    draws = np.concatenate(
        [r["alpha_y_add"][:, 1:] for _, _, r in posterior_batches(fitted, plan, seed=seed)]
    )
    truth = screen.effects[1:, keep]
    svi = fitted.svi
    return {
        "features": int(keep.sum()),
        "cells": cells,
        "seed": seed,
        "prior": prior,
        "steps": svi.niters_run,
        "stop_reason": svi.stop_reason,
        "ms_per_step": round(1000 * svi.seconds / max(svi.niters_run, 1), 2),
        "peak_rss_mb": mb(ru_maxrss_bytes()),
    } | interval_recovery(draws, truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "priors.json")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        features, cells, seed, prior = args.one
        print(json.dumps(run_one(int(features), int(cells), int(seed), prior)))
        return
    rows = []
    for features, cells, seed in SIZES:
        for prior in PRIORS:
            command = [
                sys.executable,
                __file__,
                "--one",
                str(features),
                str(cells),
                str(seed),
                prior,
            ]
            done = subprocess.run(command, capture_output=True, text=True, cwd=HERE, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\nfeatures  cells  prior            coverage90  correlation   rmse  steps")
    for r in rows:
        print(
            f"{r['features']:>8}  {r['cells']:>5}  {r['prior']:<15}  {r['coverage90']:>10.3f}  "
            f"{r['correlation']:>11.4f}  {r['rmse']:.4f}  {r['steps']:>5}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_model(), "load_average": load_average()}
    args.out.write_text(json.dumps({"machine": machine, "runs": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
