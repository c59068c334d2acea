"""Hand-off to the reference bayesDREAM: our technical fit, exported with
`bayesdream export RUN --to bayesdream DIR`, loaded by the reference's
`load_technical_fit(input_dir=DIR)`, and its next stage, `fit_cis`, run on it.

`--reference X` names a folder holding the reference's package `bayesDREAM/` (a clone, or
`git --git-dir=<clone>/.git archive --prefix=bayesDREAM/ HEAD:bayesDREAM | tar x -C X`); it
is imported from there at run time and is never part of this project. It needs matplotlib, seaborn,
h5py and scikit-learn (`pip install -e ".[bench]"`). Without `--reference` the benchmark
says it is skipped and exits 0.

1. The demo screen (`tasks.demo.write_demo_inputs`: 600 cells, 80 % NTC, cell lines HEL,
   K562, TF1, cis gene GFI1B, an all-zero and a constant gene), plus: a gene with no count
   in NTC cells but counts in GFI1B cells (excluded by our filters, kept by bayesDREAM),
   a normal modality `adt` (8 features: one constant in every cell, one constant in the
   NTC cells only) and a multinomial `m3` (5 features x 3 categories: one without counts,
   one with a single category in the NTC cells).
   `baseline_group: K562`, which sorts second: the export must reorder the groups to
   bayesDREAM's sorted order and re-reference them to HEL.
2. Our flow (`flows.technical_fit`) on it; the export (`tasks.results.export_bayesdream`).
3. The reference model on the same counts and cells (`adt` and `m3` through
   `add_custom_modality`), `set_technical_groups(["cell_line"])`,
   `load_technical_fit(input_dir=DIR)`.
4. Checks against OUR STORE, not the export: for each of the reference's group codes its
   label (from its meta), for each of its features the name; expected = our draws of that
   label and feature re-referenced to its group 0 (2 ** log2 difference for negbinom and
   the cis feature, difference for the others). Printed: shapes, feature lists equal to
   `features_<m>.txt`, max absolute difference, the loaded scale attributes.
5. `fit_cis` for `--niters` steps: wall time, first and last loss, `x_true` shape.

The reference's own prints and warnings go to `<workdir>/reference.log`.

Run:  .venv/bin/python benchmarks/bench_bayesdream_handoff.py --reference /path/to/checkout
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CIS, COVARIATE, BASELINE, NTC_ZERO = "GFI1B", "cell_line", "K562", "NTCZERO1"


def write_screen(folder: Path, *, niters: int, nsamples: int) -> Path:
    """The demo screen plus the extra features and modalities; returns the config path."""
    from tasks.demo import write_demo_inputs

    config_path = write_demo_inputs(folder, niters=niters, nsamples=nsamples)
    cells = pd.read_csv(folder / "cells.csv")
    genes = pd.read_csv(folder / "gene_counts.csv", index_col=0)
    rng = np.random.default_rng(11)
    ntc, cis_cells = cells["target"].eq("ntc").to_numpy(), cells["target"].eq(CIS).to_numpy()
    genes.iloc[10] = np.where(cis_cells, rng.poisson(5.0, len(cells)), 0)
    genes = genes.rename(index={genes.index[10]: NTC_ZERO})
    genes.to_csv(folder / "gene_counts.csv")
    line = pd.factorize(cells[COVARIATE], sort=True)[0]
    adt = rng.normal(2.0, 1.0, (8, len(cells))) + 0.5 * line  # a shift per cell line
    adt[-1], adt[-2, ntc] = 3.0, 1.0  # constant everywhere; constant in the NTC cells
    names = [f"ADT{t}" for t in range(8)]
    pd.DataFrame(adt, index=pd.Index(names, name="feature"), columns=cells["cell"]).to_csv(
        folder / "adt.csv"
    )
    shares = rng.dirichlet([4.0, 2.0, 1.0], size=(5, len(cells)))  # [T, N, K]
    m3 = rng.multinomial(20, shares.reshape(-1, 3)).reshape(5, len(cells), 3).astype(np.float32)
    m3[-1] = 0
    m3[-2, ntc, 1:] = 0  # one category in the NTC cells: excluded by our filters, kept by it
    np.save(folder / "m3.npy", m3)
    (folder / "m3_features.txt").write_text("\n".join(f"EV{t}" for t in range(5)))
    (folder / "m3_cells.txt").write_text("\n".join(cells["cell"]))
    config = yaml.safe_load(config_path.read_text())
    config["baseline_group"] = BASELINE
    config["modalities"]["adt"] = {"distribution": "normal", "counts": "adt.csv"}
    config["modalities"]["m3"] = {
        "distribution": "multinomial",
        "counts": "m3.npy",
        "features": "m3_features.txt",
        "cells": "m3_cells.txt",
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def reference_model(folder: Path, reference: Path, log):
    """The reference's model on the same cells and matrices, groups set."""
    sys.path.insert(0, str(reference))
    from bayesDREAM import bayesDREAM

    meta = pd.read_csv(folder / "cells.csv")
    meta[COVARIATE] = meta[COVARIATE].astype(str)
    counts = pd.read_csv(folder / "gene_counts.csv", index_col=0)
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        model = bayesDREAM(
            meta=meta,
            counts=counts,
            cis_gene=CIS,
            output_dir=str(folder / "reference_out"),
            device="cpu",
        )
        adt = pd.read_csv(folder / "adt.csv", index_col=0)
        model.add_custom_modality("adt", adt, pd.DataFrame(index=adt.index), "normal")
        names = (folder / "m3_features.txt").read_text().split()
        model.add_custom_modality(
            "m3",
            np.load(folder / "m3.npy"),
            pd.DataFrame(index=names),
            "multinomial",
            cell_names=list(meta["cell"]),
        )
        model.set_technical_groups([COVARIATE])
    return model


def expected_draws(group, prefix: str, labels: tuple[list[str], list[str]], mult: bool):
    """Our draws [S, C(, T(, K))] in the reference's group order, re-referenced to its
    group 0, read from the store by label (`labels`: ours, the reference's; `mult`: 2 **
    the difference of the log2 effects, else the difference)."""
    ours, ref_labels = labels
    columns = [ours.index(label) for label in ref_labels]
    add = group[f"{prefix}_add"][...].astype(np.float64)[:, columns]
    add = add - add[:, :1]
    return np.exp2(add) if mult else add


def check_modality(root, model, out: Path, name: str, ref_labels: list[str]) -> None:
    """Loaded alpha_y_prefit of `name` against the store, printed."""
    from tasks.results.export_bayesdream import features_file
    from tasks.store import read_strings, results_key

    mod = model.modalities[name]
    features = list(mod.feature_names or mod.feature_meta.index)
    listed = (out / features_file(name)).read_text().split()
    group = root[results_key(name)]
    ours = list(read_strings(group, "group_labels"))
    store_features = list(read_strings(group, "feature_names"))
    index = [store_features.index(f) for f in features]
    mult = mod.distribution == "negbinom"
    expected = expected_draws(group, "alpha_y", (ours, ref_labels), mult)[:, :, index]
    loaded = mod.alpha_y_prefit.numpy().astype(np.float64)
    scale_attr = "alpha_y_prefit_mult" if mult else "alpha_y_prefit_add"
    excluded = group["ntc_excluded_from_fit"][...][index]
    fill = 1.0 if mult else 0.0
    print(
        f"  {name:5s} {mod.distribution:11s} loaded {tuple(loaded.shape)} type "
        f"{mod.alpha_y_type}; {scale_attr} is alpha_y_prefit: "
        f"{getattr(mod, scale_attr) is mod.alpha_y_prefit}; features == {features_file(name)}: "
        f"{features == listed} ({len(features)} of the store's {len(store_features)}); "
        f"max |loaded - store| {np.abs(loaded - expected).max():.3g}; "
        f"{int(excluded.sum())} excluded at {fill}: {bool((loaded[:, :, excluded] == fill).all())}"
    )


def run(args: argparse.Namespace, folder: Path) -> None:
    """Steps 1-5; prints the figures."""
    import zarr

    from flows.technical_fit import technical_fit
    from tasks.results.export_bayesdream import export_bayesdream
    from tasks.store import CIS_KEY, read_strings

    config = write_screen(folder, niters=args.niters_ours, nsamples=args.nsamples)
    t0 = time.perf_counter()
    store = technical_fit(str(config))
    print(f"our flow: {time.perf_counter() - t0:.1f} s -> {store}")
    out = folder / "handoff"
    summary = export_bayesdream(store, out)
    print(f"export: {summary['shapes']}; groups {summary['groups']}")
    print(f"  reordered and re-referenced (our baseline {BASELINE}): {summary['reordered']}")
    root = zarr.open_group(store, mode="r")
    with open(folder / "reference.log", "w") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        model = reference_model(folder, args.reference, log)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            model.load_technical_fit(input_dir=str(out))
        print(f"reference model built and loaded: {time.perf_counter() - t0:.1f} s")
        codes = model.meta.drop_duplicates("technical_group_code").sort_values(
            "technical_group_code"
        )
        ref_labels = codes[COVARIATE].astype(str).tolist()
        print(f"  reference groups (code order) {ref_labels}; C = {len(ref_labels)}")
        ours = list(read_strings(root[CIS_KEY], "group"))
        alpha_x = model.alpha_x_prefit.numpy().astype(np.float64)
        expected = expected_draws(root[CIS_KEY], "alpha_x", (ours, ref_labels), True)
        print(
            f"  alpha_x_prefit {tuple(alpha_x.shape)} type {model.alpha_x_type}; "
            f"max |loaded - store| {np.abs(alpha_x - expected).max():.3g}; "
            f"baseline column 1.0: {bool((alpha_x[:, 0] == 1.0).all())}"
        )
        for name in ("gene", "adt", "m3"):
            check_modality(root, model, out, name, ref_labels)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            model.fit_cis(
                sum_factor_col="sum_factor",
                niters=args.niters,
                nsamples=args.cis_samples,
                tolerance=0.0,
            )
        seconds = time.perf_counter() - t0
    loss = [float(x) for x in model.loss_x]
    print(
        f"fit_cis: {len(loss)} steps, {args.cis_samples} draws in {seconds:.1f} s; loss "
        f"{loss[0]:.1f} -> {loss[-1]:.1f}; x_true {tuple(model.x_true.shape)}, finite: "
        f"{bool(np.isfinite(model.x_true.cpu().numpy()).all())}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, help="folder holding the package bayesDREAM/")
    p.add_argument("--niters", type=int, default=300, help="fit_cis steps (default 300)")
    p.add_argument("--cis-samples", type=int, default=100, help="fit_cis draws (default 100)")
    p.add_argument("--niters-ours", type=int, default=1500, help="our fit's step cap")
    p.add_argument("--nsamples", type=int, default=200, help="our posterior draws")
    p.add_argument("--workdir", type=Path, help="keep the inputs, store and export here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference is None:
        print("bench_bayesdream_handoff: skipped (no --reference checkout of bayesDREAM given)")
        return 0
    if not (args.reference / "bayesDREAM" / "__init__.py").exists():
        print(f"--reference {args.reference}: no bayesDREAM/__init__.py there", file=sys.stderr)
        return 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    own = args.workdir is None
    folder = Path(tempfile.mkdtemp(prefix="bench_handoff_")) if own else args.workdir
    os.environ.setdefault("PREFECT_HOME", str(folder / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # our flow's progress: not shown
    for name in ("bayesdream_model", "tasks"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch "
        f"{torch.__version__}, pandas {pd.__version__}; reference {args.reference}"
    )
    try:
        run(args, folder)
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
