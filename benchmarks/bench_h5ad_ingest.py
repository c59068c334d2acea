"""Benchmark: ingesting a large sparse AnnData layer against the same matrix as a CSR `.npz`.

1. **Inputs** (a fresh subprocess): a simulated screen of `--cells` x `--genes` counts at
   `--density` non-zeros (per-gene densities log-normal around it; a non-zero count is
   1 + Poisson(lambda_g * sf)), float32. Written three ways, each by its usual writer:
   - `screen.h5ad` by anndata: obs = the cells table (target, cell_line, sum_factor),
     `layers["counts"]` = the counts as CSR (cells-major, anndata's default), no X;
   - `screen_csc.h5ad`: the same with the layer as CSC (features-major);
   - `counts.npz` by scipy's `save_npz` (CSR features x cells, compressed, as the large
     ingest benchmark) with `features.txt`, `cells.txt` and `cells.csv`.
2. **Ingestion, each in a fresh subprocess** (its peak RSS is its own), as the flow runs
   it without Prefect: pre-flight (`read_cells_table` + `check_modality`), `write_cells`,
   `ingest_modality`. The AnnData runs read their cells table from the file's obs; the
   npz run from `cells.csv`. anndata is imported before the clock starts (a flow process
   has it imported). Recorded: wall and CPU time, peak RSS (VmHWM and a psutil sampler).
3. **Check**: the three stores' `inputs/gene/counts` are compared block by block (equal).
4. **Output**: a table and a JSON (default `benchmarks/results/h5ad_ingest.json`) with
   sizes, file sizes, per-run wall time and peak RSS, and the h5ad / npz ratios.

Run:  .venv/bin/python benchmarks/bench_h5ad_ingest.py                       # ~5 min
      .venv/bin/python benchmarks/bench_h5ad_ingest.py --cells 5000 --genes 800 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import (  # noqa: E402
    MIB,
    RssSampler,
    cpu_model,
    load_average,
    mb,
    ru_maxrss_bytes,
    vm_hwm_bytes,
)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "h5ad_ingest.json"
RUNS = {  # run -> (counts file, cells table, layer)
    "h5ad_csr": ("screen.h5ad", "screen.h5ad", "counts"),
    "h5ad_csc": ("screen_csc.h5ad", "screen_csc.h5ad", "counts"),
    "npz_csr": ("counts.npz", "cells.csv", None),
}
LINES = ("HEK293T", "K562", "THP1")


# --- inputs ----------------------------------------------------------------------------
def simulate(args: argparse.Namespace):
    """(counts CSR cells x genes float32, cells table) built one chunk of cells at a time."""
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(args.seed)
    p = np.clip(args.density * rng.lognormal(-0.5, 1.0, args.genes), 0.0, 0.95)
    p *= args.density / p.mean()
    lam = rng.lognormal(0.0, 1.0, args.genes)
    sf = rng.lognormal(0.0, 0.25, args.cells)
    chunks = []
    for start in range(0, args.cells, 4096):
        stop = min(start + 4096, args.cells)
        hit = rng.random((stop - start, args.genes)) < np.clip(p, 0, 0.95)
        values = np.zeros(hit.shape, dtype=np.float32)
        rate = lam[None, :] * sf[start:stop, None]
        values[hit] = 1 + rng.poisson(np.broadcast_to(rate, hit.shape)[hit])
        chunks.append(sp.csr_matrix(values))
    counts = sp.vstack(chunks, format="csr")
    cells = pd.DataFrame(
        {
            "cell": [f"C{i:07d}" for i in range(args.cells)],
            "target": np.where(rng.random(args.cells) < 0.4, "ntc", "TG00001"),
            "cell_line": rng.choice(np.array(LINES), args.cells),
            "sum_factor": sf,
        }
    )
    return counts, cells


def write_inputs(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The three files (and name files); returns sizes."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    t0 = time.perf_counter()
    counts, cells = simulate(args)
    genes = [f"G{t:05d}" for t in range(args.genes)]
    obs = cells.set_index("cell")
    obs["target"] = pd.Categorical(obs["target"])
    obs["cell_line"] = pd.Categorical(obs["cell_line"])
    var = pd.DataFrame(index=genes)
    ad.AnnData(obs=obs, var=var, layers={"counts": counts}).write_h5ad(folder / "screen.h5ad")
    ad.AnnData(obs=obs, var=var, layers={"counts": counts.tocsc()}).write_h5ad(
        folder / "screen_csc.h5ad"
    )
    sp.save_npz(folder / "counts.npz", counts.T.tocsr(), compressed=True)
    (folder / "features.txt").write_text("\n".join(genes) + "\n")
    (folder / "cells.txt").write_text("\n".join(cells["cell"]) + "\n")
    cells.to_csv(folder / "cells.csv", index=False)
    sizes = {
        name: (folder / name).stat().st_size
        for name in ("screen.h5ad", "screen_csc.h5ad", "counts.npz")
    }
    return {
        "n_cells": args.cells,
        "n_genes": args.genes,
        "nnz": int(counts.nnz),
        "density": round(counts.nnz / (args.cells * args.genes), 4),
        "dtype": "float32",
        "file_bytes": sizes,
        "write_seconds": round(time.perf_counter() - t0, 1),
    }


# --- one ingestion (worker) --------------------------------------------------------------
def run_config(folder: Path, run: str):
    from tasks.config import config_from_dict

    counts, cells, layer = RUNS[run]
    gene: dict[str, Any] = {"distribution": "negbinom", "counts": counts}
    if layer is not None:
        gene["layer"] = layer
    else:
        gene |= {"features": "features.txt", "cells": "cells.txt"}
    data = {
        "store": f"{run}.zarr",
        "cells": cells,
        "covariates": ["cell_line"],
        "modalities": {"gene": gene},
    }
    return config_from_dict(data, folder)


def worker(args: argparse.Namespace) -> None:
    """Pre-flight, cells and ingestion of one run; its record to --result."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import anndata.io  # noqa: F401  (imported before measuring, as in a flow process)

    from tasks.ingest import check_modality, ingest_modality, read_cells_table, write_cells
    from tasks.store import open_root

    folder = Path(args.workdir)
    cfg = run_config(folder, args.worker)
    shutil.rmtree(cfg.store, ignore_errors=True)
    steps = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    with RssSampler(0.05) as sampler:
        t0 = time.perf_counter()
        table = read_cells_table(cfg)
        plan = check_modality(cfg, "gene", table["cell"].to_numpy())
        root = open_root(cfg.store, create=True)
        write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
        steps["preflight_and_cells_s"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        ingest_modality(root, cfg, "gene", plan)
        steps["ingest_s"] = round(time.perf_counter() - t1, 2)
        wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "run": args.worker,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime - cpu0, 2),
        **steps,
        "peak_rss_mb": max(mb(vm_hwm_bytes()) or 0, mb(sampler.peak()) or 0),
        "ru_maxrss_mb": mb(ru_maxrss_bytes()),
    }
    Path(args.result).write_text(json.dumps(record))


# --- parent --------------------------------------------------------------------------------
def spawn(args: argparse.Namespace, role: str, folder: Path) -> dict[str, Any]:
    """`role` (generate, or a run) in a fresh subprocess; its JSON record."""
    result = folder / f"{role}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        role,
        "--workdir",
        str(folder),
        "--result",
        str(result),
        "--cells",
        str(args.cells),
        "--genes",
        str(args.genes),
        "--density",
        str(args.density),
        "--seed",
        str(args.seed),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(folder / f"{role}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode != 0:
        tail = (folder / f"{role}.log").read_text().splitlines()[-20:]
        raise SystemExit(f"{role} failed (rc {done.returncode}):\n" + "\n".join(tail))
    record = json.loads(result.read_text())
    record["process_s"] = round(time.perf_counter() - t0, 1)
    return record


def same_stores(folder: Path) -> bool:
    """Every run stored the same counts (compared one block of features at a time)."""
    import zarr

    arrays = [
        zarr.open_group(str(folder / f"{run}.zarr"), mode="r")["inputs/gene/counts"] for run in RUNS
    ]
    for start in range(0, arrays[0].shape[0], 512):
        first = arrays[0][start : start + 512]
        if not all(np.array_equal(first, a[start : start + 512]) for a in arrays[1:]):
            return False
    return True


def ratios(runs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each AnnData run's time and peak RSS over the npz run's."""
    npz = runs["npz_csr"]
    return {
        run: {
            "wall": round(runs[run]["wall_s"] / npz["wall_s"], 2),
            "ingest": round(runs[run]["ingest_s"] / npz["ingest_s"], 2),
            "peak_rss": round(runs[run]["peak_rss_mb"] / npz["peak_rss_mb"], 2),
        }
        for run in ("h5ad_csr", "h5ad_csc")
    }


def table(report: dict[str, Any]) -> str:
    s = report["screen"]
    lines = [
        f"{s['n_cells']:,} cells x {s['n_genes']:,} genes, nnz {s['nnz']:,} "
        f"(density {s['density']}), float32",
        f"{'run':<10}{'file GB':>9}{'ingest s':>10}{'wall s':>9}{'peak RSS GB':>13}",
    ]
    for run, (counts, _, _) in RUNS.items():
        r = report["runs"][run]
        lines.append(
            f"{run:<10}{s['file_bytes'][counts] / 1e9:>9.2f}{r['ingest_s']:>10.1f}"
            f"{r['wall_s']:>9.1f}{r['peak_rss_mb'] * MIB / 1e9:>13.2f}"
        )
    for run in ("h5ad_csr", "h5ad_csc"):
        ratio = report["ratios"][run]
        lines.append(
            f"{run} / npz_csr: ingest time x{ratio['ingest']}, wall x{ratio['wall']}, "
            f"peak RSS x{ratio['peak_rss']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=10_000)
    p.add_argument("--density", type=float, default=0.10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workdir", type=Path, help="keep the inputs and stores here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "generate":
        Path(args.result).write_text(json.dumps(write_inputs(args, Path(args.workdir))))
        return 0
    if args.worker:
        worker(args)
        return 0
    folder = (args.workdir or Path(tempfile.mkdtemp(prefix="bench_h5ad_", dir="/tmp"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        report: dict[str, Any] = {
            "benchmark": "h5ad_ingest",
            "machine": {
                "cpu_model": cpu_model(),
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_at_start": load_average(),
            },
        }
        print("writing inputs ...", flush=True)
        report["screen"] = spawn(args, "generate", folder)
        report["runs"] = {}
        for run in RUNS:
            print(f"ingesting {run} (fresh subprocess) ...", flush=True)
            report["runs"][run] = spawn(args, run, folder)
        report["ratios"] = ratios(report["runs"])
        report["stores_equal"] = same_stores(folder)
        report["load_average_end"] = load_average()
        text = table(report)
        report["table"] = text.splitlines()
        print(text + f"\nstores equal: {report['stores_equal']}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0 if report.get("stores_equal") else 1


if __name__ == "__main__":
    sys.exit(main())
