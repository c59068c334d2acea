"""Benchmark: ingestion and filtering of a screen larger than memory, from a sparse .npz.

Goal of the issue: "Screens larger than memory: 200,000 cells (80,000 NTC) x 30,000
genes, ~90 % zeros, sparse input: ingestion and filtering with peak RSS <= 3 GB".

1. **Simulated inputs, never held whole.** `counts.npz` is a scipy.sparse CSR archive
   (features x cells, the `save_npz` layout: a zip of `indices.npy`, `indptr.npy`,
   `format.npy` (b'csr'), `shape.npy`, `data.npy`) written member by member, one block
   of gene rows at a time. Every block's content comes from its own seeded RNG, so it is
   regenerated identically for each member (pass 0: per-row counts -> `indptr` and nnz;
   pass 1: `indices`; pass 2: `data`). Non-zero pattern: each gene g is non-zero in a
   cell with probability p_g (log-normal around `--density`, a few all-zero genes so that
   the filters flag something); a non-zero count is 1 + Poisson(lambda_g * sum_factor).
   Alongside: `cells.csv` (cell, target with `--ntc` 'ntc' cells, cell_line with 3
   values, sum_factor), `features.txt` and `cells.txt` (name files).
2. **Two stages, each in a fresh subprocess** (so its peak RSS is its own), calling the
   pipeline's functions as `tasks/steps.py` does (no Prefect):
   - `ingest`: fingerprints (the flow hashes every input file first), pre-flight
     (`read_cells_table` + `check_modality`), create-store (`open_root` + `write_cells`),
     `ingest_modality`;
   - `filter`: `assign_groups_in_store` + `filter_features(root, m, read_groups(root))`.
   Each records wall and CPU time per step, peak RSS from a psutil sampler thread
   (`--sample-interval`, default 50 ms) and `ru_maxrss`.
3. **Output**: a table and a JSON file (default `benchmarks/results/large_ingest.json`)
   with sizes, nnz, npz size on disk, store size, per-stage wall and peak RSS, the 3 GB
   target (3e9 bytes) pass/fail, and the machine (CPUs, RAM, load average).

Run:  .venv/bin/python benchmarks/bench_large_ingest.py             # full size
      .venv/bin/python benchmarks/bench_large_ingest.py --cells 20000 --ntc 8000 \
          --genes 3000 --verify --out /tmp/large_ingest.json        # small, checked
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from calibration import interval_recovery  # noqa: E402
from large_ingest_report import STAGES, TARGET_BYTES, fmt_gb, table_text  # noqa: E402
from large_ingest_worker import MODALITY, worker  # noqa: E402
from machine import (  # noqa: E402  (benchmarks/ on the path first)
    MIB,
    cpu_affinity,
    cpu_model,
    load_average,
)
from screen_writer import Screen, inputs_key  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "large_ingest.json"
WORKERS = ("generate", *STAGES)


# ---------------------------------------------------------------------------------------
# Machine and memory helpers
# ---------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """HEAD of the repository (read only)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_description(workdir: Path) -> dict[str, Any]:
    from importlib.metadata import version  # not imported: the parent stays lean

    import psutil

    affinity = cpu_affinity()
    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(workdir)
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": version("scipy"),
        "zarr": version("zarr"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_total_gb": round(vm.total / 1e9, 2),
        "ram_available_gb_at_start": round(vm.available / 1e9, 2),
        "workdir_disk_free_gb_at_start": round(disk.free / 1e9, 1),
        "load_average_at_start": load_average(),
        "git_commit": git_commit(),
    }


def tree_bytes(path: Path) -> int:
    """Bytes of every file under `path` (what the store takes on disk, apparent size)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------------------
# Workers (fresh subprocesses)
# ---------------------------------------------------------------------------------------
def _follow(logfile: Path, proc: subprocess.Popen, log) -> None:
    """Echo a worker's log lines while it runs."""
    with open(logfile) as handle:
        while True:
            line = handle.readline()
            if line:
                log(line.rstrip())
            elif proc.poll() is not None:
                return
            else:
                time.sleep(0.5)


def run_worker(args: argparse.Namespace, stage: str, workdir: Path, log) -> dict[str, Any]:
    """The stage in a fresh subprocess (own process group), killed after --timeout."""
    result = workdir / f"{stage}.result.json"
    result.unlink(missing_ok=True)
    logfile = workdir / f"{stage}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        stage,
        "--workdir",
        str(workdir),
        "--result",
        str(result),
        "--sample-interval",
        str(args.sample_interval),
    ]
    if args.skip_fingerprint:
        cmd.append("--skip-fingerprint")
    if stage == "generate":  # the screen's parameters
        for key, value in inputs_key(args).items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                cmd += [flag] if value else []
            else:
                cmd += [flag, str(value)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if stage in ("fit", "sample") and args.memory_gb:
        # the allocation a cluster job would get: the fit and the sampling plan within it
        env["SLURM_MEM_PER_NODE"] = str(int(args.memory_gb * 1000))
    for flag in ("--fit-steps", "--nsamples"):
        cmd += [flag, str(getattr(args, flag[2:].replace("-", "_")))]
    t0 = time.perf_counter()
    with open(logfile, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        if stage == "generate":  # show its progress
            follow = threading.Thread(target=_follow, args=(logfile, proc, log), daemon=True)
            follow.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = "timeout"
        if stage == "generate":
            follow.join()
    elapsed = round(time.perf_counter() - t0, 1)
    tail = logfile.read_text().splitlines()[-15:]
    if rc != 0 or not result.exists():
        log(f"  {stage}: FAILED (rc={rc}) after {elapsed} s; log tail:\n    " + "\n    ".join(tail))
        return {"stage": stage, "ok": False, "rc": rc, "process_wall_s": elapsed, "log_tail": tail}
    record = json.loads(result.read_text())
    if stage != "generate":
        record.update({"ok": True, "process_wall_s": elapsed})
    return record


# ---------------------------------------------------------------------------------------
# Verification (small sizes only): the streamed archive and the store hold the screen
# ---------------------------------------------------------------------------------------
def verify(args: argparse.Namespace, workdir: Path, log) -> dict[str, Any]:
    import pandas as pd
    import scipy.sparse as sp
    import zarr

    inputs = workdir / "inputs"
    screen = Screen(args)
    parts = [screen.block(b, values=True) for b in range(screen.n_blocks)]
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([c for c, _, _ in parts]))])
    expected = sp.csr_matrix(
        (
            np.concatenate([d for _, _, d in parts]),
            np.concatenate([c for _, c, _ in parts]),
            indptr,
        ),
        shape=(args.genes, args.cells),
    )
    loaded = sp.load_npz(inputs / "counts.npz")
    same_npz = bool(
        loaded.shape == expected.shape
        and loaded.dtype == expected.dtype
        and (loaded != expected).nnz == 0
        and loaded.has_sorted_indices
    )
    table = pd.read_csv(inputs / "cells.csv", dtype={"cell": str, "target": str})
    matrix_cells = (inputs / "cells.txt").read_text().split()
    order = pd.Index(matrix_cells).get_indexer(table["cell"])  # table column -> matrix column
    dense = loaded.toarray()[:, order].astype(np.float32)
    root = zarr.open_group(str(workdir / "store.zarr"), mode="r")
    stored = root[f"inputs/{MODALITY}/counts"][...]
    same_store = bool(np.array_equal(stored, dense))
    ntc = (table["target"] == "ntc").to_numpy()
    y = dense[:, ntc]
    flags = root[f"prep/{MODALITY}"]
    same_flags = bool(
        np.array_equal(flags["ntc_zero_count"][...], y.sum(axis=1) == 0)
        and np.array_equal(flags["ntc_zero_std"][...], y.std(axis=1) == 0)
    )
    out = {"npz_matches_generator": same_npz, "store_matches_npz": same_store}
    out["filter_flags_match_dense"] = same_flags
    log(f"  verify: {out}")
    return out


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def score_against_truth(workdir: Path) -> dict[str, Any]:
    """Posterior alpha_y_add of the fitted genes against the simulated log2 cell-line
    effects (`--model nb`): correlation and RMSE of the posterior means, 90 % coverage."""
    import zarr

    from tasks.groups import read_groups
    from tasks.store import results_key

    truth = np.load(workdir / "inputs" / "truth.npz")
    root = zarr.open_group(str(workdir / "store.zarr"), mode="r")
    labels = read_groups(root).labels
    lines = [str(v) for v in truth["cell_lines"]]
    effects = truth["effects"][[lines.index(label) for label in labels]]  # store's group order
    effects = effects - effects[0]  # relative to the store's baseline group
    group = root[results_key(MODALITY)]
    fitted = group["technical_correction_applied"][...]
    genes = np.array([int(str(n)[4:]) for n in group["feature_names"][...]])[fitted]
    draws = group["alpha_y_add"].get_orthogonal_selection(
        (slice(None), slice(1, None), np.flatnonzero(fitted))
    )
    return {**interval_recovery(draws, effects[1:, genes]), "draws": int(draws.shape[0])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--ntc", type=int, default=80_000, help="cells with target 'ntc'")
    p.add_argument("--genes", type=int, default=30_000)
    p.add_argument("--density", type=float, default=0.10, help="fraction of non-zero counts")
    p.add_argument("--zero-genes", type=float, default=0.005, help="fraction of all-zero genes")
    p.add_argument("--targets", type=int, default=2000, help="distinct targeting perturbations")
    p.add_argument("--dtype", choices=("int32", "float32"), default="int32", help="npz data")
    p.add_argument("--stored", action="store_true", help="ZIP_STORED (save_npz compressed=False)")
    p.add_argument("--compresslevel", type=int, default=-1, help="deflate level; -1: zlib's (6)")
    p.add_argument("--shuffle-cells", action="store_true", help="matrix columns != table order")
    p.add_argument("--gen-block", type=int, default=256, help="gene rows per generated block")
    p.add_argument(
        "--model",
        choices=("hurdle", "nb"),
        default="hurdle",
        help="counts: 1 + Poisson on a Bernoulli pattern (hurdle), or the fit's own NB with "
        "known cell-line effects (nb: the fit is scored against them)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-fingerprint", action="store_true", help="skip hashing the inputs")
    p.add_argument("--sample-interval", type=float, default=0.05, help="RSS sampling (s)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per stage")
    p.add_argument("--verify", action="store_true", help="check npz/store/flags (small only)")
    p.add_argument("--force", action="store_true", help="run even if the disk looks too small")
    p.add_argument(
        "--fit-steps", type=int, default=30, help="SVI steps in stage fit (0: the default run)"
    )
    p.add_argument("--nsamples", type=int, default=1000, help="posterior draws in stage sample")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=3.0,
        help="memory given to fit/sample (as SLURM_MEM_PER_NODE); 0: the machine's",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--workdir", type=Path, help="keep inputs/store here (reused if they match)")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.ntc <= args.cells:
        p.error("--ntc must be in 1..--cells")
    if not 0 < args.density < 1:
        p.error("--density must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_large_ingest_", dir="/tmp"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "large_ingest",
        "goal": (
            "ingestion and filtering of a 200,000 x 30,000 sparse screen with peak RSS <= 3 GB;"
            " the fit streams cells when they do not fit; sampling memory flat in nsamples"
        ),
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "result")
        },
        "machine": machine_description(workdir),
    }
    # Disk: the npz (~nnz x 8 B x compression) plus the store (measured ~1-2 B per cell x gene).
    nnz_est = args.cells * args.genes * args.density
    need = nnz_est * 8 * (1.0 if args.stored else 0.6) + args.cells * args.genes * 0.5
    free = shutil.disk_usage(workdir).free
    report["disk_estimate_gb"] = round(need / 1e9, 1)
    log(f"workdir {workdir}: {free / 1e9:.1f} GB free, ~{need / 1e9:.1f} GB needed (estimate)")
    if need * 1.2 > free and not args.force:
        log("not enough disk space: lower --cells/--genes or pass --force")
        return 2
    inputs = workdir / "inputs"
    meta = inputs / "meta.json"
    try:
        if meta.exists() and json.loads(meta.read_text()).get("key") == inputs_key(args):
            report["screen"] = json.loads(meta.read_text())["screen"]
            log("reusing the inputs in the workdir")
        else:
            log(
                f"writing inputs: {args.cells:,} cells ({args.ntc:,} NTC) x {args.genes:,} genes, "
                f"density {args.density}"
            )
            report["screen"] = run_worker(args, "generate", workdir, log)
            if report["screen"].get("ok") is False:
                raise SystemExit("generating the inputs failed")
            meta.write_text(json.dumps({"key": inputs_key(args), "screen": report["screen"]}))
        s = report["screen"]
        log(f"counts.npz: nnz {s['nnz']:,}, {s['npz_gb']} GB, in {s['write_seconds']} s")
        shutil.rmtree(workdir / "store.zarr", ignore_errors=True)
        report["stages"] = {}
        for stage in STAGES:
            log(f"stage {stage} (fresh subprocess) ...")
            report["stages"][stage] = run_worker(args, stage, workdir, log)
            r = report["stages"][stage]
            if r.get("ok"):
                log(f"  {stage}: {r['wall_s']} s, peak RSS {fmt_gb(r['peak_rss_mb'])} GB")
            else:
                break
        if (workdir / "store.zarr").exists():
            store_bytes = tree_bytes(workdir / "store.zarr")
            report["store_bytes"] = store_bytes
            report["store_gb"] = round(store_bytes / 1e9, 3)
        done = [r for r in report["stages"].values() if r.get("ok")]
        report["target_bytes"] = TARGET_BYTES
        report["target_pass"] = len(done) == len(STAGES) and all(
            r["peak_rss_mb"] * MIB <= TARGET_BYTES for r in done
        )
        if args.verify and len(done) == len(STAGES):
            report["verify"] = verify(args, workdir, log)
        if (inputs / "truth.npz").exists() and len(done) == len(STAGES):
            report["recovery"] = score_against_truth(workdir)
            log(f"recovery against the truth: {report['recovery']}")
        report["load_average_end"] = load_average()
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        text = table_text(report)
        report["table"] = text.splitlines()
        print("\n" + text, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.out}")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = report.get("target_pass") and all(report.get("verify", {}).values() or [True])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
