"""A second peer: glmGamPoi's Gamma-Poisson GLM (Bioconductor) on the same NTC cells.

`worker_glmgampoi` hands the fit data to `peer_glmgampoi.R` through raw little-endian
files (int32 counts, float64 size factors, int32 group codes) and runs it with `Rscript`
in a child process on one core (OpenMP/BLAS threads pinned to 1 in its environment):
`glm_gp` with the design `~cell_line` (the baseline group the reference level), the SAME
size factors as our fit (`size_factors=`, so glmGamPoi's own normalisation is not used),
its default overdispersion estimation (`overdispersion = TRUE`, with shrinkage) and
`on_disk = FALSE`. glmGamPoi reports no standard errors: the R script forms the Wald SEs
a user would, cov(beta) = (X^T W X)^-1 with W = mu / (1 + mu * overdispersion) from the
fit. Its coefficients (natural log, converted here to log2) are compared with the
simulated effects like our posterior means, and its 90 % Wald intervals
(lfc +- 1.645 SE) with the truth like our credible intervals.

"seconds" is the fit alone as timed inside R (`glm_gp` and the SEs), the figure compared
with other fits; "wall_seconds" is the whole Rscript call (R start-up, reading and writing
the files). "peak_rss_mb" is the R child's own peak (its VmHWM, else sampled with psutil).
glmGamPoi is a benchmark extra (Debian: `apt-get install r-bioc-glmgampoi`), never a
runtime dependency; without Rscript or glmGamPoi the worker reports "unavailable".
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import mb
from peer_deseq2 import wald_recovery

R_SCRIPT = Path(__file__).with_name("peer_glmgampoi.R")
EXIT_NOT_INSTALLED = 3  # the R script's exit status when glmGamPoi is missing
EXTREME_LOG2 = 20.0  # |log2 effect| above this: a degenerate fit (e.g. a group with no counts)
LOG2 = float(np.log(2.0))


def child_env() -> dict[str, str]:
    """The environment for R: one core, as our fit gets."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    return env


def sample_child_rss(proc: subprocess.Popen, stop: threading.Event, peak: list[int]) -> None:
    """Largest RSS of the child (bytes) into peak[0], sampled until it exits or `stop`."""
    import psutil

    try:
        child = psutil.Process(proc.pid)
        while not stop.is_set():
            peak[0] = max(peak[0], child.memory_info().rss)
            stop.wait(0.02)
    except psutil.Error:  # exited between samples
        pass


def read_meta(path: Path) -> dict[str, str]:
    """The R script's key<TAB>value lines."""
    lines = path.read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def worker_glmgampoi(args: argparse.Namespace) -> dict[str, Any]:
    """Fit glmGamPoi on the folder's fit data through Rscript; time, peak RSS and recovery."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return {"status": "unavailable", "reason": "Rscript not found on PATH"}
    folder = Path(args.workdir)
    with np.load(folder / "fitdata.npz") as f:
        y, groups, sf = f["y"], f["groups"], f["sum_factor"].astype(np.float64)
    with np.load(folder / "truth.npz") as f:
        truth = f["effects"]
    n_cells, n_features = y.shape
    n_groups = int(groups.max()) + 1
    with tempfile.TemporaryDirectory(prefix="glmgampoi_", dir=folder) as tmp:
        io = Path(tmp)
        np.rint(y).astype("<i4").tofile(io / "counts.i32")  # C order = R's features x cells
        sf.astype("<f8").tofile(io / "size_factors.f64")
        groups.astype("<i4").tofile(io / "groups.i32")
        del y
        dims = [str(n_cells), str(n_features), str(n_groups)]
        cmd = [rscript, "--vanilla", str(R_SCRIPT), tmp, *dims]
        stop, peak = threading.Event(), [0]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        sampler = threading.Thread(target=sample_child_rss, args=(proc, stop, peak), daemon=True)
        sampler.start()
        log, _ = proc.communicate()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        if proc.returncode == EXIT_NOT_INSTALLED:
            return {"status": "unavailable", "reason": "glmGamPoi is not installed for R"}
        if proc.returncode != 0:
            return {
                "status": f"failed (Rscript exit {proc.returncode})",
                "log_tail": log[-2000:],
            }
        meta = read_meta(io / "meta.tsv")
        beta = np.fromfile(io / "beta.f64", dtype="<f8").reshape(n_groups, n_features)
        se = np.fromfile(io / "se.f64", dtype="<f8").reshape(n_groups - 1, n_features)
    expected = ["Intercept"] + [f"cell_lineLINE{g:03d}" for g in range(1, n_groups)]
    coefficients = meta["coefficients"].split(",")
    if [c.strip("()") for c in coefficients] != expected:
        return {"status": "failed (unexpected coefficients)", "coefficients": coefficients}
    lfc, se = beta[1:] / LOG2, se / LOG2  # natural log -> log2
    np.savez(Path(args.workdir) / "estimates_glmgampoi.npz", lfc=lfc, se=se)  # for the caller
    hwm_kb = float(meta.get("vm_hwm_kb", "nan"))
    peak_rss = max(peak[0], hwm_kb * 1024 if np.isfinite(hwm_kb) else 0)
    return {
        "status": "ok",
        "seconds": round(float(meta["fit_seconds"]), 2),
        "wall_seconds": round(wall, 2),
        "peak_rss_mb": mb(peak_rss) if peak_rss else None,
        "n_extreme": int(np.sum(np.abs(lfc[np.isfinite(lfc)]) > EXTREME_LOG2)),
        "versions": {"R": meta.get("r_version"), "glmGamPoi": meta.get("glmgampoi_version")},
        "recovery": wald_recovery(lfc, se, truth[1:]),
    }
