"""Benchmark of the technical fit for every distribution family on simulated NTC screens.

For each distribution (negbinom, binomial, multinomial with K categories, normal,
studentt) on a simulated screen (default: 4,000 NTC cells x 3,000 features, 3 technical
groups), it reports

(a) ms per SVI step of OUR fit, through the real `bayesdream_model.fit.fit_technical`
    (the guide the pipeline picks, its ELBO, Adam + one-cycle + clipping), timed with a
    progress callback: median over `--steps` steps after `--warmup` untimed ones. Next to
    it, the same fit with a DENSE per-cell likelihood: the family's `observe` replaced by
    `pyro.factor("y", dense_log_likelihood_<name>(params, data).sum())` from
    `bayesdream_model/dense_likelihoods.py`, and its `tensors` by `FitTensors.from_arrays` (the raw
    cells x features data), so that priors, guide, initial values, ELBO and optimiser are
    identical and only the likelihood differs. Ratio = dense / ours.
(b) a DEFAULT run end to end through the real Prefect flow
    `flows.technical_fit.technical_fit(config)` in a fresh subprocess, on inputs written
    to disk (cells.csv; counts as .npz/.npy with features.txt + cells.txt; binomial
    denominator .npy; multinomial .npy [T, N, K]; normal/studentt .npy with ~10 % NaN),
    with the config's `fit:` section at its defaults except `nsamples` (niters null = the
    distribution's default cap, default convergence criterion): wall time of the flow call
    (ingest -> complete store) and of each stage, the store's fit_seconds /
    sampling_seconds / niters_run / stop_reason (attrs of `technical/<m>`), peak RSS of
    the subprocess (psutil sampler + ru_maxrss), and recovery of the posterior-mean
    effects `alpha_y_add[:, 1:]` vs the simulated truth (correlation, RMSE, coverage of
    90 % central intervals).
(c) the machine: CPU count, torch threads, load average before and after (other
    processes may be running: compare numbers only under similar load).

Every measured piece runs in a fresh subprocess of this script (hidden `--worker` mode)
with a temporary PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED=false and a wall-clock
limit (`--timeout`, default 20 min); a run over its limit is killed (its whole process
group) and reported as a timeout.

Run:  .venv/bin/python benchmarks/bench_distributions.py [--distributions negbinom,normal]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from dist_inputs import recovery, write_inputs  # noqa: E402
from dist_report import (  # noqa: E402
    TARGET_CORR,
    TARGET_COVERAGE,
    TARGETS,
    check_targets,
    fit_stage_seconds,
    print_report,
)
from dist_worker import worker_flow, worker_steps  # noqa: E402
from machine import (  # noqa: E402  (benchmarks/ on the path first)
    cpu_affinity,
    cpu_model,
    load_average,
)
from peer_deseq2 import worker_deseq2  # noqa: E402
from peer_glmgampoi import worker_glmgampoi  # noqa: E402

#: the peers a user would otherwise pick, run on the negbinom cells: worker name -> label
PEERS = {"glmgampoi": "glmGamPoi", "deseq2": "PyDESeq2"}

# ---------------------------------------------------------------------------------------
# Machine, load, memory and stage-timing helpers
# ---------------------------------------------------------------------------------------
SOURCE_DIRS = ("bayesdream_model", "tasks", "flows", "bayesdream_model/dense_likelihoods.py")


def git_state() -> dict[str, Any]:
    """HEAD and whether the measured sources differ from it (read-only git calls)."""

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", *SOURCE_DIRS)
    return {
        "commit": git("rev-parse", "HEAD"),
        "sources_modified": bool(dirty) if dirty is not None else None,
    }


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import pyro
    import torch

    affinity = cpu_affinity()
    vm = psutil.virtual_memory()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_total_gb": round(vm.total / 1e9, 2),
        "ram_available_gb_at_start": round(vm.available / 1e9, 2),
        "torch_version": torch.__version__,
        "pyro_version": pyro.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
        "load_average_at_start": load_average(),
        "git_at_start": git_state(),
    }


DISTRIBUTIONS = ("negbinom", "binomial", "multinomial", "normal", "studentt")
DEFAULT_OUT = HERE / "results" / "distributions.json"

#: Targets from the issue: default-run wall (s), per-step speed-up over the dense baseline.


# ---------------------------------------------------------------------------------------
# Parent: subprocesses with a limit, the table, the JSON
# ---------------------------------------------------------------------------------------
def run_worker(
    args: argparse.Namespace, folder: Path, dist: str, mode: str, extra: list[str], tag: str
) -> dict[str, Any]:
    """`_run_worker`, tried once more after a failure (not after a timeout).

    On a shared machine a worker can die for reasons outside it (memory taken by other
    processes); the first attempt's status and log tail are kept in `first_attempt`.
    """
    result = _run_worker(args, folder, dist, mode, extra, tag)
    if result["status"].startswith("failed"):
        print(f"  [{dist}] {tag}: retrying once", flush=True)
        retry = _run_worker(args, folder, dist, mode, extra, f"{tag}_retry")
        retry["first_attempt"] = {k: result[k] for k in ("status", "log_tail") if k in result}
        return retry
    return result


def _run_worker(
    args: argparse.Namespace, folder: Path, dist: str, mode: str, extra: list[str], tag: str
) -> dict[str, Any]:
    """This script in `--worker mode`, fresh process, own session; killed at --timeout."""
    result = folder / f"result_{tag}.json"
    log = folder / f"log_{tag}.txt"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--dist",
        dist,
        "--workdir",
        str(folder),
        "--worker-out",
        str(result),
        "--groups",
        str(args.groups),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--nsamples",
        str(args.nsamples),
        "--seed",
        str(args.seed),
        *extra,
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.niters is not None:
        cmd += ["--niters", str(args.niters)]
    if args.cell_batch is not None:
        cmd += ["--cell-batch", str(args.cell_batch)]
    prefect_home = folder / f"prefect_home_{tag}"
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # a busy machine starts the temporary API slowly (the CLI allows the same)
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PYTHONUNBUFFERED": "1",
        }
    )
    load_before = load_average()
    print(f"  [{dist}] {tag}: running (limit {args.timeout:.0f} s, log {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            cmd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,  # its own process group: a timeout ends all of it
        )
        try:
            rc = proc.wait(timeout=args.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
    wall = round(time.perf_counter() - t0, 2)
    base = {"process_wall_seconds": wall, "load_average_before": load_before}
    if timed_out:
        print(f"  [{dist}] {tag}: TIMEOUT after {wall} s", flush=True)
        return {**base, "status": "timeout", **progress_from_log(log)}
    if rc != 0 or not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        print(f"  [{dist}] {tag}: FAILED (rc {rc}):\n{tail}", flush=True)
        return {**base, "status": f"failed (rc {rc})", "log_tail": tail}
    data = json.loads(result.read_text())
    print(f"  [{dist}] {tag}: done in {wall} s", flush=True)
    return {**base, "status": "ok", **data}


PROGRESS = re.compile(r"SVI step (\d+)/(\d+) \(\d+%\), loss ([-+.\deE]+), ([\d.]+) steps/s")


def progress_from_log(log: Path) -> dict[str, Any]:
    """How far a killed fit got: the last progress line the pipeline logged."""
    hits = PROGRESS.findall(log.read_text(errors="replace")) if log.exists() else []
    if not hits:
        return {}
    step, niters, loss, rate = hits[-1]
    return {
        "last_logged_step": int(step),
        "niters_cap": int(niters),
        "last_logged_loss": float(loss),
        "steps_per_second": float(rate),
    }


def bench_one(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Inputs, step timings (ours, dense), the default flow and recovery for one family."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {
        "distribution": name,
        "git_before": git_state(),
        "load_average_before": load_average(),
    }
    data = write_inputs(name, args, folder)
    (folder / "modality.json").write_text(json.dumps(data["modality"]))
    row["data"] = data
    print(
        f"  [{name}] inputs {data['shape']} written ({data['inputs_mb']} MB; simulate "
        f"{data['simulate_seconds']} s, write {data['write_seconds']} s)",
        flush=True,
    )
    if not args.skip_steps:
        row["steps_ours"] = run_worker(args, folder, name, "steps", ["--impl", "ours"], "ours")
        row["steps_dense"] = run_worker(args, folder, name, "steps", ["--impl", "dense"], "dense")
        ours = row["steps_ours"].get("ms_per_step_median")
        dense = row["steps_dense"].get("ms_per_step_median")
        row["speedup"] = round(dense / ours, 2) if ours and dense else None
    if not args.skip_flow:
        row["flow"] = run_worker(args, folder, name, "flow", [], "flow")
        if row["flow"].get("status") == "ok":
            try:
                row["recovery"] = recovery(row["flow"]["store"], name, folder)
            except Exception as err:  # noqa: BLE001 - report it, keep benchmarking
                print(f"  [{name}] recovery FAILED: {err!r}", flush=True)
                row["recovery"] = {"error": repr(err)}
    if name == "negbinom" and not args.skip_peer:
        ours = fit_stage_seconds(row.get("flow", {}))
        for peer in PEERS:
            row[f"peer_{peer}"] = run_worker(args, folder, name, peer, [], peer)
            seconds = row[f"peer_{peer}"].get("seconds")
            row[f"peer_{peer}_speedup"] = round(seconds / ours, 2) if ours and seconds else None
        row["peer_speedup"] = row["peer_deseq2_speedup"]  # the key earlier results use
    row["load_average_after"] = load_average()
    row["git_after"] = git_state()
    row["targets_missed"] = check_targets(name, row)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--distributions",
        default=",".join(DISTRIBUTIONS),
        help=f"comma-separated subset of {','.join(DISTRIBUTIONS)} (default: all)",
    )
    p.add_argument("--cells", type=int, default=4000, help="NTC cells (default 4000)")
    p.add_argument("--features", type=int, default=3000, help="features (default 3000)")
    p.add_argument("--groups", type=int, default=3, help="technical groups C (default 3)")
    p.add_argument("--categories", type=int, default=4, help="multinomial K (default 4)")
    p.add_argument("--missing", type=float, default=0.1, help="NaN fraction, normal/studentt")
    p.add_argument(
        "--shift-scale",
        type=float,
        default=None,
        help="normal/studentt: effects N(0, (s x each feature's sd)^2) instead of N(0, 0.25)",
    )
    p.add_argument(
        "--fit-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a fit: option of the flow's config (repeatable), e.g. continuous_prior=standard_error",
    )
    p.add_argument("--student-df", type=float, default=3.0, help="studentt noise df (3)")
    p.add_argument("--effect-sd", type=float, default=0.5, help="sd of simulated effects")
    p.add_argument(
        "--nb-mean",
        type=float,
        default=5.0,
        help="negbinom: median baseline mean per unit size factor (5: ~10 %% zeros; "
        "0.08: ~89 %% zeros, droplet-like)",
    )
    p.add_argument(
        "--nb-phi",
        type=float,
        default=5.0,
        help="negbinom: median dispersion phi (default 5; 1: as overdispersed as many "
        "droplet screens)",
    )
    p.add_argument(
        "--sf-sd",
        type=float,
        default=0.3,
        help="negbinom: sd of the log size factors (default 0.3; 0.7: library sizes "
        "spread as in droplet screens)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed SVI steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed SVI steps first (default 5)")
    p.add_argument("--nsamples", type=int, default=1000, help="posterior draws (default 1000)")
    p.add_argument(
        "--niters",
        type=int,
        default=None,
        help="fit.niters for the flow (default: null = the distribution's default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the step timings and fit.threads of the flow "
        "(default: the pipeline's default, fit.threads null)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="wall-clock limit per subprocess in seconds (default 1200)",
    )
    p.add_argument(
        "--cell-batch",
        type=int,
        help="stream the fit cells in batches of this many (fit.stream_cells: always)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-steps", action="store_true", help="skip (a), the step timings")
    p.add_argument("--skip-flow", action="store_true", help="skip (b), the default flow run")
    p.add_argument(
        "--skip-peer",
        action="store_true",
        help="skip the peers on the negbinom cells (PyDESeq2: pip install -e '.[bench]'; "
        "glmGamPoi: apt-get install r-bioc-glmgampoi)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output ({DEFAULT_OUT})")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep inputs, stores and worker logs here (default: a temp dir, removed)",
    )
    # worker mode (internal)
    p.add_argument("--worker", choices=["steps", "flow", *PEERS], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dist", choices=DISTRIBUTIONS, help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        names = [d.strip() for d in args.distributions.split(",") if d.strip()]
        unknown = sorted(set(names) - set(DISTRIBUTIONS))
        if unknown:
            p.error(f"unknown distribution(s) {unknown}; choose from {','.join(DISTRIBUTIONS)}")
        args.distributions = names
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step includes the guide's setup)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parent: for each distribution, inputs -> workers -> recovery; table and JSON."""
    args = parse_args(argv)
    if args.worker:
        workers = {
            "steps": worker_steps,
            "flow": worker_flow,
            "deseq2": worker_deseq2,
            "glmgampoi": worker_glmgampoi,
        }
        result = workers[args.worker](args)
        args.worker_out.write_text(json.dumps(result, indent=2, default=str))
        return 0
    started = time.perf_counter()
    own = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="bench_distributions_")) if own else args.workdir
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "technical fit per distribution: SVI step vs dense baseline, default flow",
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "worker_out", "dist", "impl")
        },
        "machine": machine_description(),
        "targets": {
            "per_distribution": TARGETS,
            "corr_min": TARGET_CORR,
            "coverage90": TARGET_COVERAGE,
        },
        "rows": [],
    }
    m = report["machine"]
    print(
        f"machine: {m['cpu_count']} cpus, torch default threads {m['torch_default_threads']}, "
        f"load average {m['load_average_at_start']}; workdir {root}",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.distributions:
            print(f"\n[{name}]", flush=True)
            report["rows"].append(bench_one(name, args, root))
            report["load_average_at_end"] = load_average()
            report["total_seconds"] = round(time.perf_counter() - started, 1)
            args.out.write_text(json.dumps(report, indent=2, default=str))  # partial results
            if own:
                shutil.rmtree(root / name, ignore_errors=True)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    report["load_average_at_end"] = load_average()
    report["git_at_end"] = git_state()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print_report(report)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"  JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
