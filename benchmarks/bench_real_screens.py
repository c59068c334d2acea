"""Screens shaped like real droplet data: both baselines, per effect class, beside the peers.

    python benchmarks/bench_real_screens.py [--cells 30000] [--features 5000]
        [--priors empirical,weak] [--skip-peer] [--out benchmarks/results/real_screens.json]

Each screen is drawn by `bayesdream_model.simulate.simulate_real_screen`: three cell lines
holding 60 / 30 / 10 % of the cells (K562, TF1, HEL: HEL, the small one, sorts first and is
the default baseline), ~15 % of them NTC, size factors with a log-sd of 0.5 and a depth that
differs by line, gene means over four decades (~18 % of entries non-zero), dispersions
spread as well, and effects that mix small shifts (sd 0.25 log2), large ones (sd 1.5, 15 %
of pairs) and genes off in one line (log2 effect -6 to -10 in HEL, 5 % of genes: cell-line
specific genes). Rows:

1. silent genes in HEL, `baseline_group: K562` (the large line is the baseline);
2. no silent genes, HEL the baseline (the default rule);
3. silent genes in HEL, HEL the baseline (the default rule): the genes off in the baseline
   have effects bounded from one side only.

Each row runs the real flow (`bayesdream run` defaults but nsamples; the negbinom prior of
`--priors`) in a fresh process, on inputs written to disk (cells.csv with every cell, NTC or
not; counts as a CSR .npz), and reads the store: SVI steps, Newton iterations, the fit
stage's wall, SVI seconds, the flow's wall (ingest to complete store) and peak RSS; per
effect class (small, large, silent; all), the RMSE of the posterior means against the
simulated effects, their median absolute error and the coverage of 90 % intervals; the
features flagged `baseline_no_counts` and their coverage. The peers (glmGamPoi, PyDESeq2:
`~cell_line` with the same baseline as reference level, the same NTC cells, features and
size factors, one core) are scored alike from their log2 fold changes and 90 % Wald
intervals. Ratios: the peers' fit time over our fit stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_distributions import PEERS, git_state, machine_description, run_worker  # noqa: E402
from dist_report import fit_stage_seconds, fmt  # noqa: E402

from bayesdream_model.simulate import (  # noqa: E402
    EFFECT_CLASSES,
    RealScreenShape,
    simulate_real_screen,
)

LABELS = ("K562", "TF1", "HEL")  # group index -> cell line; HEL (10 %) sorts first
SCREENS = (
    ("silent genes in the small line, the large line the baseline", 0.05, "K562"),
    ("no silent genes, the small line the baseline (sorts first)", 0.0, None),
    ("silent genes in the small line, which is the baseline (sorts first)", 0.05, None),
)
Z90 = 1.6448536269514722
DEFAULT_OUT = HERE / "results" / "real_screens.json"


def code_order(baseline: str | None) -> list[int]:
    """Group indices in code order: the named baseline first, then sorted labels."""
    first = LABELS.index(baseline) if baseline else int(np.argmin(LABELS))
    rest = sorted((g for g in range(len(LABELS)) if g != first), key=lambda g: LABELS[g])
    return [first, *rest]


def write_inputs(screen, folder: Path, baseline: str | None, prior: str, nsamples: int) -> dict:
    """The flow's inputs (every cell), the peers' fit data (NTC cells, kept features) and
    the truth in code order."""
    import pandas as pd
    import scipy.sparse as sp

    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    genes = screen.feature_names
    targets = np.where(
        screen.is_ntc, "ntc", np.asarray(genes)[np.arange(screen.counts.shape[1]) % len(genes)]
    )
    pd.DataFrame(
        {
            "cell": screen.cell_ids,
            "target": targets,
            "guide": np.where(screen.is_ntc, "ntc_1", "g_1"),
            "cell_line": np.asarray(LABELS)[screen.groups],
            "sum_factor": screen.sum_factor,
        }
    ).to_csv(inputs / "cells.csv", index=False)
    sp.save_npz(inputs / "counts.npz", sp.csr_matrix(screen.counts))
    (inputs / "features.txt").write_text("\n".join(genes) + "\n")
    (inputs / "cells.txt").write_text("\n".join(screen.cell_ids) + "\n")
    modality = {
        "distribution": "negbinom",
        "counts": str(inputs / "counts.npz"),
        "features": str(inputs / "features.txt"),
        "cells": str(inputs / "cells.txt"),
    }
    (folder / "modality.json").write_text(json.dumps(modality))
    extra = {"baseline_group": baseline, "fit": {"negbinom_baseline_prior": prior}}
    (folder / "config_extra.json").write_text(json.dumps(extra))
    order = code_order(baseline)
    recode = np.empty(len(order), dtype=np.int64)
    recode[order] = np.arange(len(order))
    y = screen.counts[:, screen.is_ntc].T.astype(np.float32)  # [N_ntc, T]
    keep = (y.sum(0) > 0) & (y.std(0) > 0)  # the filters' zero-count and constant flags
    np.savez(
        folder / "fitdata.npz",
        y=y[:, keep],
        groups=recode[screen.groups[screen.is_ntc]],
        sum_factor=screen.sum_factor[screen.is_ntc].astype(np.float32),
    )
    truth = screen.effects_against(order[0])[order]
    classes = screen.effect_class(order[0])[order]
    np.savez(
        folder / "truth.npz",
        effects=truth[:, keep],
        classes=classes[:, keep],
        feature_names=np.asarray(genes)[keep],
    )
    base_ntc = screen.groups[screen.is_ntc] == order[0]
    return {
        "baseline": LABELS[order[0]],
        "baseline_ntc_cells": int(base_ntc.sum()),
        "ntc_cells": int(screen.is_ntc.sum()),
        "features_fit": int(keep.sum()),
        "nonzero_fraction": round(float(np.count_nonzero(screen.counts)) / screen.counts.size, 4),
    }


def by_class(estimate, low, high, truth, classes, flagged=None) -> dict[str, Any]:
    """RMSE, median |error| and 90 % coverage per effect class (and over all, and over the
    features flagged baseline_no_counts when given); arrays [C-1, T]."""
    out = {}
    finite = np.isfinite(estimate) & np.isfinite(low) & np.isfinite(high)
    masks = {name: classes == k for k, name in enumerate(EFFECT_CLASSES)}
    masks["all"] = np.ones_like(truth, dtype=bool)
    if flagged is not None:
        masks["baseline_no_counts"] = np.broadcast_to(flagged, truth.shape)
    for name, mask in masks.items():
        ok = mask & finite
        if not mask.any():
            continue
        error = estimate[ok] - truth[ok]
        out[name] = {
            "n": int(mask.sum()),
            "not_estimated": int((mask & ~finite).sum()),
            "rmse": round(float(np.sqrt(np.mean(error**2))), 4) if ok.any() else None,
            "median_abs_error": round(float(np.median(np.abs(error))), 4) if ok.any() else None,
            "coverage90": round(float(np.mean((truth[ok] >= low[ok]) & (truth[ok] <= high[ok]))), 4)
            if ok.any()
            else None,
        }
    return out


def our_recovery(store: str, folder: Path) -> dict[str, Any]:
    """Per class from the store's draws of alpha_y_add (fit features, code order)."""
    import zarr

    group = zarr.open_group(store, mode="r")["technical/negbinom"]
    names = [str(n) for n in group["feature_names"][...]]
    with np.load(folder / "truth.npz") as f:
        truth, classes, truth_names = f["effects"], f["classes"], f["feature_names"].astype(str)
    where = {n: i for i, n in enumerate(names)}
    index = np.asarray([where[n] for n in truth_names])
    draws = np.asarray(group["alpha_y_add"][...])[:, 1:][:, :, index]  # [S, C-1, T]
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    flagged = np.asarray(group["baseline_no_counts"][...])[index]
    labels = [str(v) for v in group["group_labels"][...]]
    mean = draws.mean(0)
    np.savez(folder / "estimates_ours.npz", lfc=mean, low=low, high=high)
    result = by_class(mean, low, high, truth[1:], classes[1:], flagged)
    return {"groups": labels, "flagged_baseline_no_counts": int(flagged.sum()), **result}


def common_recovery(folder: Path, names: list[str]) -> dict[str, Any]:
    """Every method's per-class figures on the effects that all of them estimate (finite
    estimate and interval): the like-for-like comparison of error."""
    with np.load(folder / "truth.npz") as f:
        truth, classes = f["effects"][1:], f["classes"][1:]
    estimates = {}
    for name in names:
        with np.load(folder / f"estimates_{name}.npz") as f:
            if "low" in f:
                estimates[name] = (f["lfc"], f["low"], f["high"])
            else:
                lfc, se = f["lfc"], f["se"]
                estimates[name] = (lfc, lfc - Z90 * se, lfc + Z90 * se)
    common = np.ones(truth.shape, dtype=bool)
    for values in estimates.values():
        common &= np.isfinite(np.stack(values)).all(0)
    out = {"n_common": int(common.sum()), "n_all": int(common.size)}
    for name, (est, low, high) in estimates.items():
        keep = lambda x: np.where(common, x, np.nan)  # noqa: E731
        out[name] = by_class(keep(est), keep(low), keep(high), truth, classes)
    return out


def peer_recovery(folder: Path, peer: str) -> dict[str, Any] | None:
    """Per class from a peer's saved log2 fold changes and SEs."""
    path = folder / f"estimates_{peer}.npz"
    if not path.exists():
        return None
    with np.load(path) as f:
        lfc, se = f["lfc"], f["se"]
    with np.load(folder / "truth.npz") as f:
        truth, classes = f["effects"], f["classes"]
    return by_class(lfc, lfc - Z90 * se, lfc + Z90 * se, truth[1:], classes[1:])


def run_row(args, root: Path, screen, row_spec, prior: str) -> dict[str, Any]:
    """One screen and prior: inputs, our flow, the peers, and their recoveries."""
    title, silent, baseline = row_spec
    tag = f"{'silent' if silent else 'plain'}_{baseline or 'default'}_{prior}"
    folder = root / tag
    folder.mkdir(parents=True, exist_ok=True)
    data = write_inputs(screen, folder, baseline, prior, args.nsamples)
    worker_args = argparse.Namespace(
        groups=3, steps=1, warmup=1, nsamples=args.nsamples, seed=args.seed, threads=None,
        niters=None, cell_batch=None, timeout=args.timeout,
    )  # fmt: skip
    row: dict[str, Any] = {"screen": title, "prior": prior, "data": data}
    flow = run_worker(worker_args, folder, "negbinom", "flow", [], f"flow_{prior}")
    row["flow"] = {k: v for k, v in flow.items() if k != "log_tail"}
    if flow.get("status") == "ok":
        row["ours"] = our_recovery(flow["store"], folder)
        row["newton_iterations"] = _laplace(flow["store"]).get("iterations")
    ours_fit = fit_stage_seconds(flow)
    if not args.skip_peer and prior == args.priors[0]:
        for peer in PEERS:
            result = run_worker(worker_args, folder, "negbinom", peer, [], peer)
            result["by_class"] = peer_recovery(folder, peer)
            seconds = result.get("seconds")
            result["seconds_over_our_fit_stage"] = (
                round(seconds / ours_fit, 2) if seconds and ours_fit else None
            )
            row[f"peer_{peer}"] = result
        present = ["ours"] + [p for p in PEERS if (folder / f"estimates_{p}.npz").exists()]
        if len(present) > 1:
            row["common"] = common_recovery(folder, present)
    return row


def _laplace(store: str) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(store, mode="r")["fit/negbinom"].attrs).get("laplace_start") or {}


def _get(classes: dict[str, Any], cls: str, key: str) -> Any:
    """One figure of one effect class from a `by_class` result (None when absent)."""
    return (classes.get(cls) or {}).get(key)


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The table: steps, times, error and coverage per class."""
    print(
        f"\n{'screen':<62} {'base':<5} {'prior':<9} {'steps':>5} {'newt':>4} {'SVI s':>6} "
        f"{'fit s':>6} {'wall s':>6} {'RSS MB':>6} {'cov all':>7} {'cov sm':>6} "
        f"{'cov lg':>6} {'cov sil':>7} {'RMSE sil':>8} {'flagged':>7} {'cov fl':>6}"
    )
    for r in rows:
        flow, ours = r.get("flow") or {}, r.get("ours") or {}

        def cov(name: str, ours: dict = ours) -> str:
            return fmt(_get(ours, name, "coverage90"), ".3f")

        rss = max(flow.get("rss_peak_mb") or 0, flow.get("vm_hwm_mb") or 0)
        print(
            f"{r['screen'][:62]:<62} {r['data']['baseline']:<5} {r['prior']:<9} "
            f"{fmt(flow.get('niters_run'), 'd'):>5} {fmt(r.get('newton_iterations'), 'd'):>4} "
            f"{fmt(flow.get('fit_seconds')):>6} {fmt(fit_stage_seconds(flow)):>6} "
            f"{fmt(flow.get('flow_call_seconds')):>6} {fmt(rss, '.0f'):>6} {cov('all'):>7} "
            f"{cov('small'):>6} {cov('large'):>6} {cov('silent'):>7} "
            f"{fmt((ours.get('silent') or {}).get('rmse'), '.3f'):>8} "
            f"{fmt(ours.get('flagged_baseline_no_counts'), 'd'):>7} {cov('baseline_no_counts'):>6}"
        )
    print(
        f"\n{'peers on the same cells':<62} {'base':<5} {'peer':<9} {'fit s':>6} {'x ours':>6} "
        f"{'RSS MB':>6} {'RMSE all':>8} {'RMSE sm':>7} {'RMSE lg':>7} {'RMSE sil':>8} "
        f"{'medAE sil':>9} {'cov all':>7} {'cov sil':>7} {'n/a':>5}"
    )
    for r in rows:
        entries = [("ours", None, r.get("ours") or {})]
        entries += [
            (p, r[f"peer_{p}"], r[f"peer_{p}"].get("by_class") or {})
            for p in PEERS
            if r.get(f"peer_{p}")
        ]
        if len(entries) == 1:
            continue
        for name, peer, classes in entries:
            flow = r.get("flow") or {}
            seconds = fit_stage_seconds(flow) if peer is None else peer.get("seconds")
            ratio = None if peer is None else peer.get("seconds_over_our_fit_stage")
            rss = (
                max(flow.get("rss_peak_mb") or 0, flow.get("vm_hwm_mb") or 0)
                if peer is None
                else peer.get("peak_rss_mb")
            )

            def get(cls: str, key: str, classes: dict = classes) -> Any:
                return _get(classes, cls, key)

            print(
                f"{r['screen'][:62]:<62} {r['data']['baseline']:<5} {name:<9} {fmt(seconds):>6} "
                f"{fmt(ratio, '.2f'):>6} {fmt(rss, '.0f'):>6} {fmt(get('all', 'rmse'), '.3f'):>8} "
                f"{fmt(get('small', 'rmse'), '.3f'):>7} {fmt(get('large', 'rmse'), '.3f'):>7} "
                f"{fmt(get('silent', 'rmse'), '.3g'):>8} {fmt(get('silent', 'median_abs_error'), '.3f'):>9} "
                f"{fmt(get('all', 'coverage90'), '.3f'):>7} {fmt(get('silent', 'coverage90'), '.3f'):>7} "
                f"{fmt(get('all', 'not_estimated'), 'd'):>5}"
            )  # fmt: skip


def print_common(rows: list[dict[str, Any]]) -> None:
    """Error and coverage on the effects every method estimates."""
    print(
        f"\n{'like for like: effects all methods estimate':<62} {'base':<5} {'method':<9} "
        f"{'n':>6} {'RMSE all':>8} {'RMSE sm':>7} {'RMSE lg':>7} {'RMSE sil':>8} "
        f"{'medAE':>6} {'cov all':>7} {'cov sil':>7}"
    )
    for r in rows:
        common = r.get("common")
        if not common:
            continue
        for name in ("ours", *PEERS):
            classes = common.get(name)
            if not classes:
                continue

            def get(cls: str, key: str, classes: dict = classes) -> Any:
                return _get(classes, cls, key)

            print(
                f"{r['screen'][:62]:<62} {r['data']['baseline']:<5} {name:<9} "
                f"{common['n_common']:>6} {fmt(get('all', 'rmse'), '.3f'):>8} "
                f"{fmt(get('small', 'rmse'), '.3f'):>7} {fmt(get('large', 'rmse'), '.3f'):>7} "
                f"{fmt(get('silent', 'rmse'), '.3g'):>8} {fmt(get('all', 'median_abs_error'), '.3f'):>6} "
                f"{fmt(get('all', 'coverage90'), '.3f'):>7} {fmt(get('silent', 'coverage90'), '.3f'):>7}"
            )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=30_000, help="cells, NTC or not (30,000)")
    p.add_argument("--features", type=int, default=5_000)
    p.add_argument("--priors", default="empirical", help="negbinom baseline priors (comma list)")
    p.add_argument("--nsamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--skip-peer", action="store_true", help="ours only")
    p.add_argument("--rows", default="1,2,3", help="which screens (1-3, comma list)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and stores here")
    args = p.parse_args()
    args.priors = [v.strip() for v in args.priors.split(",") if v.strip()]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_real_screens_"))
    report: dict[str, Any] = {
        "benchmark": "real-shaped screens, both baselines, per effect class, beside the peers",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_description(),
        "git": git_state(),
        "rows": [],
    }
    started = time.perf_counter()
    screens: dict[float, Any] = {}
    for number in (int(v) for v in args.rows.split(",")):
        spec = SCREENS[number - 1]
        if spec[1] not in screens:
            shape = RealScreenShape(
                n_cells=args.cells, n_features=args.features, silent_fraction=spec[1],
                seed=args.seed,
            )  # fmt: skip
            screens[spec[1]] = simulate_real_screen(shape)
        for prior in args.priors:
            print(f"== {spec[0]} ({prior})", flush=True)
            report["rows"].append(run_row(args, root, screens[spec[1]], spec, prior))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print_rows(report["rows"])
    print_common(report["rows"])
    print(f"\n-> {args.out} (workdir {root})")


if __name__ == "__main__":
    main()
