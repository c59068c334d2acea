"""The default guide at every screen size: coverage and correlation of each negbinom guide.

    python benchmarks/bench_guides.py [--quick] [--out benchmarks/results/guides.json]

Held-out screens (seeds no test uses) drawn from `bayesdream_model.simulate`, NTC cells
only, 3 cell lines, from 300 to 20,000 latents ((C + 1) x T). For each size, the default
(`guide: auto`) and the other guides where they apply (the reference's IAF up to its CPU
limit of 5,000 latents, mean-field) are fitted with the default stop rule, each in a
fresh process with one torch thread; the posterior's 90 % intervals of the log2 effects
are checked against the truth. Printed per run: latents, guide, steps and why it stopped,
ms/step, fit seconds, peak RSS, correlation of posterior means with the truth, RMSE,
90 % coverage; then, per size, how far auto is from the best guide's correlation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from calibration import interval_recovery
from machine import cpu_model, load_average, mb, ru_maxrss_bytes

HERE = Path(__file__).resolve().parent
GROUPS = 3
#: (features, NTC cells, seeds, guides besides auto)
SIZES = [
    (75, 1200, (9101, 9102, 9103), ("iaf", "mean_field")),
    (400, 1200, (9101, 9102), ()),
    (400, 1200, (9101,), ("iaf", "mean_field")),  # the IAF here: ~1 h a fit on 2 cores
    (1250, 1200, (9101,), ("mean_field",)),  # the IAF at 5,000 latents: ~1 h on 2 cores
    (5000, 2000, (9101,), ("mean_field",)),
]
QUICK = [(75, 600, (9101,), ("iaf",)), (400, 600, (9101,), ())]
NSAMPLES = 400


def run_one(features: int, cells: int, seed: int, guide: str) -> dict:
    """One fit in this process (called in a fresh child): recovery of the known effects."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import bayesdream_model.guides as guides
    from bayesdream_model.data import FitArrays
    from bayesdream_model.distributions import get_family
    from bayesdream_model.fit import FitOptions, fit_technical
    from bayesdream_model.memory import SamplingPlan
    from bayesdream_model.posterior import posterior_batches
    from bayesdream_model.simulate import simulate_negbinom_screen

    screen = simulate_negbinom_screen(
        n_cells=cells, n_features=features, n_groups=GROUPS, seed=seed
    )
    y = screen.counts.T.astype(np.float32)
    keep = (y.sum(0) > 0) & (y.std(0) > 0)  # the filters' zero-count and constant flags
    data = FitArrays(y[:, keep], screen.groups, GROUPS, screen.sum_factor.astype(np.float32))
    if guide == "mean_field":  # the reference's choice: mean-field (IAF off)
        guides.CPU_FLOW_MAX_LATENT = 0
    preference = "mean_field" if guide == "mean_field" else guide
    start = time.perf_counter()
    fitted = fit_technical(get_family("negbinom"), data, FitOptions(guide=preference))
    fit_s = time.perf_counter() - start
    plan = SamplingPlan(NSAMPLES, 100, True, 0, "benchmark")
    draws = np.concatenate(
        [r["log2_alpha_y"] for _, _, r in posterior_batches(fitted, plan, seed=seed)]
    )
    truth = screen.log2_alpha[1:, keep]
    svi = fitted.svi
    return {
        "features": int(keep.sum()),
        "cells": cells,
        "seed": seed,
        "latents": (GROUPS + 1) * int(keep.sum()),
        "guide": guide,
        "guide_used": fitted.guide_kind,
        "steps": svi.niters_run,
        "stop_reason": svi.stop_reason,
        "ms_per_step": round(1000 * svi.seconds / max(svi.niters_run, 1), 2),
        "fit_s": round(fit_s, 1),
        "peak_rss_mb": mb(ru_maxrss_bytes()),
    } | interval_recovery(draws, truth)


def child(features: int, cells: int, seed: int, guide: str) -> dict:
    """`run_one` in a fresh process; a failure is a result too (the IAF may diverge)."""
    command = [sys.executable, __file__, "--one", str(features), str(cells), str(seed), guide]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {
            "features": features,
            "cells": cells,
            "seed": seed,
            "guide": guide,
            "error": last[:300],
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> list[dict]:
    """Per size and guide: pooled coverage (weighted by effects), mean correlation."""
    out = []
    keys = sorted({(r["features"], r["cells"]) for r in rows if "error" not in r})
    for features, cells in keys:
        at = [r for r in rows if (r["features"], r["cells"]) == (features, cells)]
        by_guide = {}
        for guide in sorted({r["guide"] for r in at}):
            ok = [r for r in at if r["guide"] == guide and "error" not in r]
            failed = [r for r in at if r["guide"] == guide and "error" in r]
            if not ok:
                by_guide[guide] = {"failed": len(failed)}
                continue
            weights = [r["n_effects"] for r in ok]
            by_guide[guide] = {
                "coverage90": round(
                    sum(r["coverage90"] * w for r, w in zip(ok, weights, strict=True))
                    / sum(weights),
                    4,
                ),
                "correlation": round(sum(r["correlation"] for r in ok) / len(ok), 5),
                "ms_per_step": round(sum(r["ms_per_step"] for r in ok) / len(ok), 1),
                "steps": round(sum(r["steps"] for r in ok) / len(ok)),
                "failed": len(failed),
            }
        best = max(v.get("correlation", -1) for v in by_guide.values())
        auto = by_guide.get("auto", {})
        out.append(
            {
                "latents": (GROUPS + 1) * max(r["features"] for r in at if "error" not in r),
                "features": features,
                "cells": cells,
                "guides": by_guide,
                "auto_correlation_gap": None
                if "correlation" not in auto
                else round(best - auto["correlation"], 5),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "guides.json")
    parser.add_argument(
        "--done", type=Path, help="JSON lines of runs already made (printed by a run): kept"
    )
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        features, cells, seed, guide = args.one
        print(json.dumps(run_one(int(features), int(cells), int(seed), guide)))
        return
    done = [json.loads(line) for line in args.done.read_text().splitlines()] if args.done else []
    rows = []
    for features, cells, seeds, others in QUICK if args.quick else SIZES:
        for guide in ("auto", *others):
            for seed in seeds:
                key = (cells, seed, guide)
                made = [  # the filters drop a few features: the same size within 5 %
                    r
                    for r in done
                    if (r["cells"], r["seed"], r["guide"]) == key
                    and abs(r["features"] - features) <= 0.05 * features
                ]
                row = made[0] if made else child(features, cells, seed, guide)
                if made and row in rows:
                    continue  # listed twice in SIZES
                done.append(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarise(rows)
    print("\nlatents  cells  guide        coverage90  correlation  ms/step  steps  failed")
    for size in summary:
        for guide, v in size["guides"].items():
            print(
                f"{size['latents']:>7}  {size['cells']:>5}  {guide:<11}  "
                f"{v.get('coverage90', float('nan')):>10.3f}  {v.get('correlation', float('nan')):>11.4f}  "
                f"{v.get('ms_per_step', float('nan')):>7.1f}  {v.get('steps', 0):>5}  {v['failed']:>6}"
            )
        print(f"         auto's correlation gap to the best guide: {size['auto_correlation_gap']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {"cpu": cpu_model(), "load_average": load_average()},
                "runs": rows,
                "summary": summary,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
