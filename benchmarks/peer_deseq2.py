"""The peer a user would otherwise pick: PyDESeq2's NB GLM on the same NTC cells.

Run by `bench_distributions.py --worker deseq2` in a fresh process (one core: numba and
BLAS threads pinned to 1, PyDESeq2's `n_cpus=1`): the design `~cell_line`, the SAME size
factors as our fit (set before the dispersion steps, so PyDESeq2's median-of-ratios is
not used), then one Wald contrast per non-baseline group. Its log2 fold changes are
compared with the simulated effects like our posterior means, and its 90 % Wald
intervals (lfc +- 1.645 lfcSE) with the truth like our credible intervals. PyDESeq2 is a
benchmark extra (`pip install -e ".[bench]"`), never a runtime dependency.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import RssSampler, mb, vm_hwm_bytes

Z90 = 1.6448536269514722


def pin_threads() -> None:
    """One core, as our fit gets: set before numpy/numba/BLAS start their pools."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[name] = "1"


def worker_deseq2(args: argparse.Namespace) -> dict[str, Any]:
    """Fit PyDESeq2 on the folder's fit data; time, peak RSS and recovery."""
    pin_threads()
    import pandas as pd
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    folder = Path(args.workdir)
    with np.load(folder / "fitdata.npz") as f:
        y, groups, sf = f["y"], f["groups"], f["sum_factor"].astype(np.float64)
    with np.load(folder / "truth.npz") as f:
        truth, genes = f["effects"], f["feature_names"].astype(str)
    labels = np.asarray([f"LINE{g:03d}" for g in range(int(groups.max()) + 1)])
    cells = [f"c{n}" for n in range(y.shape[0])]
    counts = pd.DataFrame(np.rint(y).astype(np.int64), index=cells, columns=genes)
    metadata = pd.DataFrame({"cell_line": labels[groups]}, index=cells)
    with RssSampler() as rss:
        start = time.perf_counter()
        dds = DeseqDataSet(
            counts=counts,
            metadata=metadata,
            design="~cell_line",
            inference=DefaultInference(n_cpus=1),
            quiet=True,
        )
        dds.obs["size_factors"] = sf
        dds.layers["normed_counts"] = dds.X / sf[:, None]
        dds.var["_normed_means"] = dds.layers["normed_counts"].mean(axis=0)  # as it does
        for step in (
            dds.fit_genewise_dispersions,
            dds.fit_dispersion_trend,
            dds.fit_dispersion_prior,
            dds.fit_MAP_dispersions,
            dds.fit_LFC,
            dds.calculate_cooks,
            dds.refit,
            dds.cooks_outlier,
        ):
            step()
        lfc, se = [], []
        for g in range(1, len(labels)):
            stats = DeseqStats(
                dds,
                contrast=["cell_line", labels[g], labels[0]],
                inference=DefaultInference(n_cpus=1),
                quiet=True,
            )
            stats.summary()
            lfc.append(stats.results_df["log2FoldChange"].to_numpy())
            se.append(stats.results_df["lfcSE"].to_numpy())
        seconds = time.perf_counter() - start
    lfc, se = np.asarray(lfc), np.asarray(se)
    np.savez(folder / "estimates_deseq2.npz", lfc=lfc, se=se)  # per effect, for the caller
    return {
        "status": "ok",
        "seconds": round(seconds, 2),
        "peak_rss_mb": mb(max(rss.peak() or 0, vm_hwm_bytes() or 0)),  # own peak, not inherited
        "recovery": wald_recovery(lfc, se, truth[1:]),
    }


def wald_recovery(lfc: np.ndarray, se: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Correlation and RMSE of the estimates, coverage of lfc +- 1.645 SE, on the genes
    PyDESeq2 reports finite values for."""
    ok = np.isfinite(lfc) & np.isfinite(se)
    est, t, half = lfc[ok], truth[ok], Z90 * se[ok]
    return {
        "n_effects": int(ok.sum()),
        "n_not_estimated": int((~ok).sum()),
        "corr": round(float(np.corrcoef(est, t)[0, 1]), 6),
        "rmse": round(float(np.sqrt(np.mean((est - t) ** 2))), 4),
        "coverage90": round(float(np.mean(np.abs(est - t) <= half)), 4),
    }
