"""The large-screen benchmark's stages, each run in a fresh subprocess by
`bench_large_ingest.py --worker <stage>`: generate, ingest, filter, fit, sample.

Each records wall and CPU time per step, peak RSS from a psutil sampler thread and
`ru_maxrss`/VmHWM, and writes its record as JSON to `--result`.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

from machine import RssSampler, load_average, mb, ru_maxrss_bytes, vm_hwm_bytes
from screen_writer import write_inputs

MODALITY = "gene"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_config(workdir: Path):
    from tasks.config import config_from_dict

    inputs = workdir / "inputs"
    return config_from_dict(
        {
            "store": str(workdir / "store.zarr"),
            "cells": str(inputs / "cells.csv"),
            "covariates": ["cell_line"],
            "modalities": {
                MODALITY: {
                    "distribution": "negbinom",
                    "counts": str(inputs / "counts.npz"),
                    "features": str(inputs / "features.txt"),
                    "cells": str(inputs / "cells.txt"),
                }
            },
        },
        workdir,
    )


class Steps:
    """Times steps within a worker: wall, CPU, sampled RSS peak, ru_maxrss after."""

    def __init__(self, sampler: RssSampler) -> None:
        self.sampler, self.records = sampler, []

    def run(self, name: str, fn, *a, **kw):
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = fn(*a, **kw)
        t1 = time.perf_counter()
        time.sleep(0.06)  # one more sample inside the window's tail
        self.records.append(
            {
                "step": name,
                "wall_s": round(t1 - t0, 2),
                "cpu_s": round(cpu_seconds() - c0, 2),
                "rss_peak_mb": mb(self.sampler.peak(t0, t1 + 0.06)),
                "ru_maxrss_after_mb": mb(ru_maxrss_bytes()),
            }
        )
        logging.getLogger("bench").info("step %s: %.1f s", name, t1 - t0)
        return result


def worker(args: argparse.Namespace) -> None:
    """One stage in this (fresh) process; writes its record to --result."""
    if args.worker == "generate":
        inputs = Path(args.workdir) / "inputs"

        def log(msg: str) -> None:
            print(msg, flush=True)

        screen = write_inputs(args, inputs, log)
        screen["generator_peak_rss_mb"] = mb(vm_hwm_bytes())
        Path(args.result).write_text(json.dumps(screen, indent=2))
        return
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    t_import = time.perf_counter()
    # Import what the stage needs before measuring (as a flow process has them imported).
    from tasks.config import RunConfig  # noqa: F401
    from tasks.filter.flags import filter_features
    from tasks.fingerprint import fingerprints
    from tasks.groups import assign_groups_in_store, read_groups
    from tasks.ingest import check_modality, ingest_modality, read_cells_table, write_cells
    from tasks.store import open_root

    workdir = Path(args.workdir)
    rss_after_import = __import__("psutil").Process().memory_info().rss
    record: dict[str, Any] = {
        "stage": args.worker,
        "import_s": round(time.perf_counter() - t_import, 2),
        "rss_after_imports_mb": mb(rss_after_import),
        "load_average_before": load_average(),
    }
    cfg = run_config(workdir)
    log = logging.getLogger("bench.pipeline")
    with RssSampler(args.sample_interval) as sampler:
        steps = Steps(sampler)
        t0, c0 = time.perf_counter(), cpu_seconds()
        if args.worker == "ingest":
            if not args.skip_fingerprint:
                steps.run("fingerprints", fingerprints, cfg)

            def preflight():
                table = read_cells_table(cfg)
                return check_modality(cfg, MODALITY, table["cell"].to_numpy())

            plan = steps.run("preflight", preflight)

            def create_store():
                root = open_root(cfg.store, create=True)
                write_cells(root, read_cells_table(cfg), cfg.covariates, cfg.sum_factor_col)
                return root

            root = steps.run("create_store", create_store)
            steps.run("ingest", ingest_modality, root, cfg, MODALITY, plan, log)
        elif args.worker in ("fit", "sample"):
            record[args.worker] = model_stage(args, cfg, steps, log)
        else:
            root = open_root(cfg.store)
            steps.run(
                "assign_groups",
                assign_groups_in_store,
                root,
                use_all_cells=cfg.use_all_cells,
                policy=cfg.groups_without_ntc,
            )
            flags = steps.run(
                "filter_features", lambda: filter_features(root, MODALITY, read_groups(root), log)
            )
            record["flags"] = {k: int(v.sum()) for k, v in flags.as_dict().items()}
        t1 = time.perf_counter()
        record.update(
            {
                "wall_s": round(t1 - t0, 2),
                "cpu_s": round(cpu_seconds() - c0, 2),
                "rss_peak_sampled_mb": mb(sampler.peak()),
                "n_rss_samples": len(sampler.samples),
            }
        )
    record["ru_maxrss_mb"] = mb(ru_maxrss_bytes())
    record["vm_hwm_mb"] = mb(vm_hwm_bytes())
    record["peak_rss_mb"] = max(
        record["ru_maxrss_mb"], record["vm_hwm_mb"] or 0, record["rss_peak_sampled_mb"] or 0
    )
    record["steps"] = steps.records
    record["load_average_after"] = load_average()
    Path(args.result).write_text(json.dumps(record, indent=2))


def model_stage(args: argparse.Namespace, cfg, steps: Steps, log) -> dict[str, Any]:
    """`fit` (a capped number of SVI steps; cells streamed when they do not fit the
    memory the worker is given) or `sample` (all draws into the store)."""
    from tasks.config import FitConfig
    from tasks.fit.fitting import fit_modality
    from tasks.sample.sampling import SampleRequest, sample_modality
    from tasks.store import fit_key, open_root

    root = open_root(cfg.store)
    if args.worker == "sample":
        request = SampleRequest(nsamples=args.nsamples, seed=0)
        return steps.run("sample", sample_modality, root, MODALITY, request, log)
    fit = FitConfig(niters=args.fit_steps or None, lr=1e-3)  # 0: the default run
    summary = steps.run("fit", fit_modality, root, MODALITY, fit, log)
    attrs = dict(root[fit_key(MODALITY)].attrs)
    return {
        **summary,
        "cell_batches": attrs.get("cell_batches"),
        "guide": attrs.get("guide"),
        "laplace_seconds": attrs.get("laplace_seconds"),
        "svi_seconds": round(attrs["fit_seconds"], 1),
        "ms_per_step": round(1000 * attrs["fit_seconds"] / attrs["niters_run"], 1),
        "n_fit_features": int(root[fit_key(MODALITY)]["features"].shape[0]),
    }
