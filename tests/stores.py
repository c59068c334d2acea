"""Small stores of every distribution, ingested, filtered and fit (no Prefect), for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
import zarr

from tasks.config import RunConfig, load_config
from tasks.filter.flags import filter_features
from tasks.fit.fitting import fit_modality
from tasks.groups import assign_groups_in_store, read_groups
from tasks.ingest import check_modality, ingest_modality, read_cells_table, write_cells
from tasks.store import open_root


def matrix_values(distribution: str, rng: np.random.Generator, shape: tuple[int, int]) -> dict:
    """Values (and a denominator) with the last feature made constant: excluded."""
    if distribution == "binomial":
        n = rng.poisson(20.0, shape).astype(np.float32)
        y = rng.binomial(n.astype(int), 0.3).astype(np.float32)
        y[-1] = 0
        return {"counts": y, "denominator": n}
    if distribution == "multinomial":
        y = rng.poisson(5.0, (*shape, 3)).astype(np.float32)
        y[-1] = 0
        return {"counts": y}
    if distribution in ("normal", "studentt"):
        y = rng.normal(1.0, 1.0, shape).astype(np.float32)
        y[-1] = 2.0
        y[0, :3] = np.nan  # missing values
        return {"counts": y}
    y = rng.poisson(5.0, shape).astype(np.float32)
    y[-1] = 0
    return {"counts": y}


def npy_store(folder: Path, distribution: str, n_groups: int) -> tuple[zarr.Group, dict]:
    """A small screen as .npy + name files, ingested, filtered and fit."""
    rng = np.random.default_rng(3)
    n_cells, n_features = 60, 5
    cells = [f"c{i}" for i in range(n_cells)]
    lines = np.array(["A", "B", "C"])[np.arange(n_cells) % n_groups]
    pd.DataFrame(
        {
            "cell": cells,
            "target": "ntc",
            "cell_line": lines,
            "sum_factor": rng.lognormal(0.0, 0.2, n_cells),
        }
    ).to_csv(folder / "cells.csv", index=False)
    (folder / "features.txt").write_text("\n".join(f"f{t}" for t in range(n_features)))
    (folder / "cells.txt").write_text("\n".join(cells))
    modality = {"distribution": distribution, "features": "features.txt", "cells": "cells.txt"}
    for key, values in matrix_values(distribution, rng, (n_features, n_cells)).items():
        np.save(folder / f"{key}.npy", values)
        modality[key] = f"{key}.npy"
    config = {
        "store": "run.zarr",
        "cells": "cells.csv",
        "covariates": ["cell_line"] if n_groups > 1 else [],
        "modalities": {"m": modality},
        "fit": {"niters": 50, "nsamples": 17},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(folder / "config.yaml")
    root = filtered_store(cfg, "m")
    fit_modality(root, "m", cfg.fit)
    return root, {"S": 17, "C": n_groups, "T": n_features}


def filtered_store(cfg: RunConfig, name: str) -> zarr.Group:
    """The config's store with modality `name` ingested, grouped and filtered."""
    table = read_cells_table(cfg)
    root = open_root(cfg.store, create=True)
    write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    ingest_modality(root, cfg, name, check_modality(cfg, name, table["cell"].to_numpy()))
    assign_groups_in_store(root, use_all_cells=False, policy="drop")
    filter_features(root, name, read_groups(root))
    return root
