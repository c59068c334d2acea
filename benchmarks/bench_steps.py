"""SVI steps to today's posterior quality: the Laplace start against the old start, per family.

    python benchmarks/bench_steps.py [--quick] [--families negbinom,studentt]
        [--sizes 1000x200,2000x500] [--seeds 9201] [--reuse-old results.json]
        [--out benchmarks/results/steps.json]

Held-out screens (seeds no test uses) drawn from `bayesdream_model.simulate`, 3 groups,
every cell fit; each family at each size is fitted at the package defaults twice, in
fresh processes with one torch thread: `init: prior` (the initial values, the
reference's one-cycle schedule over the iteration cap and the 250-step plateau rule: the
old default) and `init: laplace` (the new default). Per fit: SVI steps and why they
stopped, the Laplace phase's Newton iterations and gradient evaluations (each a whole-data
gradient, about one SVI step's work), ms per SVI step, fit seconds, and from 400
posterior draws the correlation of the posterior-mean effects with the truth, their RMSE
and the coverage of 90 % central intervals. Then per family and size the ratios old / new
of SVI steps, of all gradient evaluations (SVI steps + the Laplace phase's), of fit
seconds, and the quality differences new - old.

Timings on a shared machine are noisy: steps and gradient evaluations are the figures.
`--reuse-old` takes the old-default rows from an earlier results file instead of refitting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model, load_average

HERE = Path(__file__).resolve().parent
FAMILIES = ("negbinom", "binomial", "multinomial", "normal", "studentt")
GROUPS = 3
SIZES = ((1000, 200), (2000, 500))  # (cells, features)
QUICK = ((600, 60),)
SEEDS = (9201,)
MODES = ("prior", "laplace")
NSAMPLES = 400


def simulate(family: str, cells: int, features: int, seed: int):
    """(FitArrays of the fit features, true effects [C-1, T(, K)] of those features)."""
    import numpy as np

    from bayesdream_model import simulate as sim
    from bayesdream_model.data import FitArrays
    from bayesdream_model.distributions import get_family

    size = {"n_cells": cells, "n_features": features, "n_groups": GROUPS, "seed": seed}
    if family == "negbinom":
        screen = sim.simulate_negbinom_screen(**size)
        y, truth = screen.counts.T.astype(np.float32), screen.log2_alpha[1:]
        data = FitArrays(y, screen.groups, GROUPS, screen.sum_factor.astype(np.float32))
    else:
        if family == "binomial":
            drawn = sim.simulate_binomial(**size)
        elif family == "multinomial":
            drawn = sim.simulate_multinomial(**size)
        else:
            drawn = sim.simulate_continuous(
                **size, student_df=3.0 if family == "studentt" else None
            )
        den = drawn.denominator
        data = FitArrays(
            y=np.moveaxis(drawn.y, 0, 1).astype(np.float32),
            groups=drawn.groups,
            n_groups=GROUPS,
            denominator=None if den is None else den.T.astype(np.float32),
        )
        truth = drawn.effects[1:]
    keep = get_family(family).flags(data).technical_correction_applied
    return data.select_features(keep), truth[:, keep]


def run_one(family: str, cells: int, features: int, seed: int, mode: str) -> dict:
    """One fit at the defaults (`init` = mode), in this process (a fresh child)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from bayesdream_model.distributions import get_family
    from bayesdream_model.fit import FitOptions, fit_technical
    from bayesdream_model.posterior import draw_range

    data, truth = simulate(family, cells, features, seed)

    start = time.perf_counter()
    fitted = fit_technical(get_family(family), data, FitOptions(seed=seed, init=mode))
    fit_s = time.perf_counter() - start
    draws = draw_range(fitted, 0, NSAMPLES, seed=seed)["alpha_y_add"][:, 1:]
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    mean = draws.mean(axis=0)
    svi, laplace = fitted.svi, fitted.svi.start or {}
    return {
        "family": family,
        "cells": cells,
        "features": int(data.n_features),
        "seed": seed,
        "mode": mode,
        "guide": fitted.guide_kind,
        "steps": svi.niters_run,
        "stop_reason": svi.stop_reason,
        "newton_iterations": laplace.get("iterations", 0),
        "laplace_gradients": laplace.get("gradient_evaluations", 0),
        "laplace_kept_start": laplace.get("features_kept_start", 0),
        "laplace_s": laplace.get("seconds", 0.0),
        "ms_per_step": round(1000 * svi.seconds / max(svi.niters_run, 1), 2),
        "fit_s": round(fit_s, 1),
        "correlation": round(float(np.corrcoef(mean.ravel(), truth.ravel())[0, 1]), 5),
        "rmse": round(float(np.sqrt(((mean - truth) ** 2).mean())), 5),
        "coverage90": round(float(((truth >= low) & (truth <= high)).mean()), 4),
        "n_effects": int(truth.size),
    }


def child(family: str, cells: int, features: int, seed: int, mode: str) -> dict:
    """`run_one` in a fresh process; a failure is a row with its error."""
    args = [family, str(cells), str(features), str(seed), mode]
    done = subprocess.run(
        [sys.executable, __file__, "--one", *args], capture_output=True, text=True, cwd=HERE
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"family": family, "cells": cells, "seed": seed, "mode": mode, "error": last[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rows: list[dict]) -> list[dict]:
    """Per family, size and seed: old / new ratios and new - old quality."""
    out = []
    new_rows = [r for r in rows if r["mode"] == "laplace" and "error" not in r]
    for new in new_rows:
        key = (new["family"], new["cells"], new["seed"])
        old = next(
            (
                r
                for r in rows
                if r["mode"] == "prior"
                and "error" not in r
                and (r["family"], r["cells"], r["seed"]) == key
            ),
            None,
        )
        if old is None:
            continue
        work_new = new["steps"] + new["laplace_gradients"]
        out.append(
            {
                "family": new["family"],
                "cells": new["cells"],
                "features": new["features"],
                "seed": new["seed"],
                "steps_old": old["steps"],
                "steps_new": new["steps"],
                "laplace_gradients": new["laplace_gradients"],
                "step_ratio": round(old["steps"] / new["steps"], 2),
                "work_ratio": round(old["steps"] / work_new, 2),
                "time_ratio": round(old["fit_s"] / max(new["fit_s"], 1e-9), 2),
                "d_correlation": round(new["correlation"] - old["correlation"], 5),
                "d_coverage90": round(new["coverage90"] - old["coverage90"], 4),
                "d_rmse": round(new["rmse"] - old["rmse"], 5),
            }
        )
    return out


def print_tables(rows: list[dict], ratios: list[dict]) -> None:
    """One line a fit, then one line a comparison."""
    print(
        "\nfamily       cells  feat  mode     steps  newton  grads  ms/step  fit_s"
        "  corr     rmse     cov90"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['family']:<11}  {r['cells']:>5}  {r['mode']:<7}  error: {r['error']}")
            continue
        print(
            f"{r['family']:<11}  {r['cells']:>5}  {r['features']:>4}  {r['mode']:<7}"
            f"  {r['steps']:>5}  {r['newton_iterations']:>6}  {r['laplace_gradients']:>5}"
            f"  {r['ms_per_step']:>7.2f}  {r['fit_s']:>5.1f}  {r['correlation']:.5f}"
            f"  {r['rmse']:.5f}  {r['coverage90']:.4f}"
        )
    print("\nfamily       cells  steps old/new  x steps  x work  x time  d_corr    d_cov90")
    for c in ratios:
        print(
            f"{c['family']:<11}  {c['cells']:>5}  {c['steps_old']:>6}/{c['steps_new']:<6}"
            f"  {c['step_ratio']:>7.2f}  {c['work_ratio']:>6.2f}  {c['time_ratio']:>6.2f}"
            f"  {c['d_correlation']:+.5f}  {c['d_coverage90']:+.4f}"
        )


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'1000x200,2000x500' -> ((1000, 200), (2000, 500))."""
    return tuple(tuple(int(x) for x in part.split("x")) for part in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--sizes", type=parse_sizes, default=None, help="CELLSxFEATURES,...")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--modes", default=",".join(MODES), help="prior,laplace or one")
    parser.add_argument("--reuse-old", type=Path, default=None, help="old rows from this JSON")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "steps.json")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        family, cells, features, seed, mode = args.one
        print(json.dumps(run_one(family, int(cells), int(features), int(seed), mode)))
        return
    sizes = args.sizes or (QUICK if args.quick else SIZES)
    seeds = [int(s) for s in args.seeds.split(",")]
    reused = [] if args.reuse_old is None else json.loads(args.reuse_old.read_text())["runs"]
    rows: list[dict] = []
    began = time.perf_counter()
    for family in args.families.split(","):
        for cells, features in sizes:
            for seed in seeds:
                for mode in args.modes.split(","):
                    old = [
                        r
                        for r in reused
                        if mode == "prior"
                        and (r["family"], r["cells"], r["seed"], r["mode"])
                        == (family, cells, seed, mode)
                    ]
                    row = old[0] if old else child(family, cells, features, seed, mode)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    ratios = compare(rows)
    print_tables(rows, ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "SVI steps to today's quality: init laplace vs prior, per family",
        "machine": {"cpu": cpu_model(), "load_average_at_end": load_average()},
        "total_seconds": round(time.perf_counter() - began, 1),
        "runs": rows,
        "comparison": ratios,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
