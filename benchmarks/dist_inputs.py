"""The per-distribution benchmark's simulated screens: inputs written to disk, and the
recovery of the simulated effects from a finished store."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from calibration import cramer_rao_rmse
from machine import MIB


def group_labels(n_groups: int) -> np.ndarray:
    """Labels whose sorted order is the code order (code g -> labels[g])."""
    return np.asarray([f"LINE{g:03d}" for g in range(n_groups)])


def simulate(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Draw one screen with `bayesdream_model.simulate`; arrays are features x cells (x K)."""
    from bayesdream_model import simulate as sim

    size = {"n_cells": args.cells, "n_features": args.features, "n_groups": args.groups}
    if name == "negbinom":
        s = sim.simulate_negbinom_screen(
            **size,
            effect_sd=args.effect_sd,
            mu_median=args.nb_mean,
            phi_median=args.nb_phi,
            sf_sd=args.sf_sd,
            seed=args.seed,
        )
        return {
            "y": s.counts,
            "groups": s.groups,
            "sum_factor": s.sum_factor,
            "effects": s.log2_alpha,
            "denominator": None,
            "cramer_rao_rmse": cramer_rao_rmse(s.mu, s.phi, s.log2_alpha, s.sum_factor, s.groups),
        }
    if name == "binomial":
        s = sim.simulate_binomial(**size, effect_sd=args.effect_sd, seed=args.seed)
    elif name == "multinomial":
        s = sim.simulate_multinomial(**size, n_categories=args.categories, seed=args.seed)
    elif name == "normal":
        s = sim.simulate_continuous(
            **size, missing=args.missing, shift_scale=args.shift_scale, seed=args.seed
        )
    elif name == "studentt":
        s = sim.simulate_continuous(
            **size,
            student_df=args.student_df,
            missing=args.missing,
            shift_scale=args.shift_scale,
            seed=args.seed,
        )
    else:
        raise ValueError(name)
    rng = np.random.default_rng(args.seed + 17)
    return {
        "y": s.y,
        "groups": s.groups,
        "sum_factor": rng.lognormal(0.0, 0.3, size=args.cells),
        "effects": s.effects,
        "denominator": s.denominator,
    }


def write_inputs(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Simulate; write the flow's inputs, the step workers' dense fit data and the truth."""
    import pandas as pd
    import scipy.sparse as sp

    if args.fit_option:  # the flow's config, beyond its defaults (`dist_worker.flow_config`)
        fit = dict(item.split("=", 1) for item in args.fit_option)
        (folder / "config_extra.json").write_text(json.dumps({"fit": fit}))
    t0 = time.perf_counter()
    screen = simulate(name, args)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    y, groups = screen["y"], screen["groups"]
    n_features, n_cells = y.shape[:2]
    cells = np.asarray([f"cell{n:06d}" for n in range(n_cells)])
    features = np.asarray([f"{name[:4]}{t:05d}" for t in range(n_features)])
    pd.DataFrame(
        {
            "cell": cells,
            "target": "ntc",
            "guide": "ntc_1",
            "cell_line": group_labels(args.groups)[groups],
            "sum_factor": screen["sum_factor"],
        }
    ).to_csv(inputs / "cells.csv", index=False)
    (inputs / "features.txt").write_text("\n".join(features) + "\n")
    (inputs / "cells.txt").write_text("\n".join(cells) + "\n")
    modality: dict[str, Any] = {
        "distribution": name,
        "features": str(inputs / "features.txt"),
        "cells": str(inputs / "cells.txt"),
    }
    if name == "negbinom":
        counts = sp.csr_matrix(y.astype(np.int32))
        sp.save_npz(inputs / "counts.npz", counts)
        modality["counts"] = str(inputs / "counts.npz")
        fmt = "counts.npz (scipy.sparse CSR, features x cells, int32)"
    elif name in ("normal", "studentt"):
        np.save(inputs / "values.npy", y.astype(np.float32))
        modality["counts"] = str(inputs / "values.npy")
        fmt = f"values.npy (float32 features x cells, {np.isnan(y).mean():.1%} NaN)"
    else:
        np.save(inputs / "counts.npy", y.astype(np.int32))
        modality["counts"] = str(inputs / "counts.npy")
        fmt = "counts.npy (int32 features x cells" + (" x K)" if y.ndim == 3 else ")")
    if screen["denominator"] is not None:
        np.save(inputs / "denominator.npy", screen["denominator"].astype(np.int32))
        modality["denominator"] = str(inputs / "denominator.npy")
        fmt += " + denominator.npy (int32)"
    fmt += " + features.txt + cells.txt + cells.csv"
    needed = not args.skip_steps or (name == "negbinom" and not args.skip_peer)
    if needed:  # what the step workers and the peer fit: all cells NTC, cells x features
        fit = {
            "y": np.ascontiguousarray(np.swapaxes(y, 0, 1), dtype=np.float32),
            "groups": groups.astype(np.int64),
            "sum_factor": screen["sum_factor"].astype(np.float32),
        }
        if screen["denominator"] is not None:
            fit["denominator"] = np.ascontiguousarray(screen["denominator"].T, dtype=np.float32)
        np.savez(folder / "fitdata.npz", **fit)
    np.savez(folder / "truth.npz", effects=screen["effects"], feature_names=features)
    input_bytes = sum(p.stat().st_size for p in inputs.iterdir())
    return {
        "modality": modality,
        "format": fmt,
        "shape": list(y.shape),
        "n_groups": args.groups,
        "inputs_mb": round(input_bytes / MIB, 1),
        "nonzero_fraction": round(float(np.count_nonzero(y)) / y.size, 4),
        "simulate_seconds": round(t_sim, 2),
        "write_seconds": round(time.perf_counter() - t0, 2),
        "cramer_rao_rmse": round(screen["cramer_rao_rmse"], 4) if name == "negbinom" else None,
    }


def recovery(store: str, name: str, folder: Path) -> dict[str, Any]:
    """Posterior-mean alpha_y_add[:, 1:] vs truth on fit features (unmasked categories)."""
    import zarr

    root = zarr.open_group(store, mode="r")
    group = root[f"technical/{name}"]
    fit = np.asarray(group["technical_correction_applied"][...], dtype=bool)
    names = np.asarray(group["feature_names"][...], dtype=object).astype(str)
    with np.load(folder / "truth.npz") as f:
        truth_all, truth_names = f["effects"], f["feature_names"].astype(str)
    order = {n: i for i, n in enumerate(truth_names)}
    idx = np.asarray([order[n] for n in names])[fit]
    draws = np.asarray(group["alpha_y_add"][...])[:, 1:]  # [S, C-1, T(, K)]
    draws = draws[:, :, fit]
    truth = truth_all[1:][:, idx]
    keep = np.ones(truth.shape, dtype=bool)
    fit_inputs = root[f"fit/{name}/inputs"]
    if "mask" in fit_inputs:  # multinomial: categories masked out of the fit are fixed at 0
        keep &= ~np.asarray(fit_inputs["mask"][...], dtype=bool)[None]
    mean = draws.mean(axis=0, dtype=np.float64)
    lo, hi = np.quantile(draws, [0.05, 0.95], axis=0)
    m, t, lo, hi = mean[keep], truth[keep], lo[keep], hi[keep]
    return {
        "n_effects": int(t.size),
        "n_features_fit": int(fit.sum()),
        "n_features_excluded": int((~fit).sum()),
        "n_samples": int(draws.shape[0]),
        "corr": round(float(np.corrcoef(m, t)[0, 1]), 6),  # the 0.99 target is checked on this
        "rmse": round(float(np.sqrt(np.mean((m - t) ** 2))), 4),
        "coverage90": round(float(np.mean((lo <= t) & (t <= hi))), 4),
        "mean_width90": round(float(np.mean(hi - lo)), 4),
        "truth_sd": round(float(t.std()), 4),
    }
