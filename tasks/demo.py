"""A small simulated screen on disk, with a config that runs in well under a minute.

`write_demo_inputs(folder)` writes

- `cells.csv`: cell, target (`ntc` or a gene such as `GFI1B`), guide, cell_line, sum_factor
- `gene_counts.csv`: features x cells, first column = feature names
- `truth.npz`: the simulated effects (`log2_alpha` [C, T], `mu`, `phi`), feature names,
  group labels in code order, and the names of the features the filters must drop
- `config.yaml`: a run on all of it, store at `results/run.zarr`

Group codes follow sorted label order (pandas `groupby(...).ngroup()`), so the labels
are sorted before being assigned to the simulation's codes: code 0 = first label.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bayesdream_model.simulate import SimulatedScreen, simulate_negbinom_screen
from tasks.config import load_config

logger = logging.getLogger(__name__)

CELL_LINES = ("K562", "HEL", "TF1", "MOLM13", "THP1", "KG1", "HL60", "U937", "NB4")
TARGET_GENES = ("GFI1B", "MYB", "NFE2", "TAL1")
CIS_FEATURE = "GFI1B"
ZERO_FEATURE = "ALLZERO1"  # zero counts in every cell: flagged ntc_zero_count
CONSTANT_FEATURE = "CONST1"  # the same raw count in every cell: flagged ntc_zero_std
CONSTANT_VALUE = 3


def write_demo_inputs(
    directory: str | Path,
    *,
    n_cells: int = 600,
    n_features: int = 60,
    n_groups: int = 3,
    ntc_fraction: float = 0.8,
    seed: int = 0,
    niters: int = 1500,
    nsamples: int = 200,
) -> Path:
    """Simulate a screen into `directory` and return the path of its `config.yaml`."""
    if n_features < len(TARGET_GENES) + 2:
        raise ValueError(f"n_features must be at least {len(TARGET_GENES) + 2}, got {n_features}")
    folder = Path(directory)
    (folder / "results").mkdir(parents=True, exist_ok=True)
    screen = simulate_negbinom_screen(
        n_cells=n_cells,
        n_features=n_features,
        n_groups=n_groups,
        ntc_fraction=ntc_fraction,
        seed=seed,
    )
    counts, names = _plant_features(screen)
    labels = group_labels(n_groups)
    rng = np.random.default_rng(seed + 1)
    _cells_table(screen, labels, rng).to_csv(folder / "cells.csv", index=False)
    frame = pd.DataFrame(counts, index=pd.Index(names, name="feature"), columns=screen.cell_ids)
    frame.to_csv(folder / "gene_counts.csv")
    np.savez(
        folder / "truth.npz",
        log2_alpha=screen.log2_alpha,
        mu=screen.mu,
        phi=screen.phi,
        feature_names=names,
        group_labels=np.asarray(labels),
        filtered_features=np.asarray([ZERO_FEATURE, CONSTANT_FEATURE]),
        zero_feature=ZERO_FEATURE,
        constant_feature=CONSTANT_FEATURE,
        cis_feature=CIS_FEATURE,
    )
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(_config(niters, nsamples, seed), sort_keys=False))
    load_config(config)  # the demo must always produce a valid config
    logger.info(
        "Demo screen (%d cells x %d features, %d groups) in '%s'.",
        n_cells,
        n_features,
        n_groups,
        folder,
    )
    return config


def group_labels(n_groups: int) -> list[str]:
    """Cell-line labels whose sorted order is the code order (code g -> labels[g])."""
    if n_groups <= len(CELL_LINES):
        return sorted(CELL_LINES[:n_groups])
    return [f"LINE{g:03d}" for g in range(n_groups)]


def _plant_features(screen: SimulatedScreen) -> tuple[np.ndarray, np.ndarray]:
    """Real-looking names for the target genes, plus one all-zero and one constant feature."""
    counts = screen.counts.copy()
    names = screen.feature_names.astype(object).copy()
    names[: len(TARGET_GENES)] = TARGET_GENES  # feature 0 = the cis feature GFI1B
    names[-2], names[-1] = ZERO_FEATURE, CONSTANT_FEATURE
    counts[-2] = 0
    counts[-1] = CONSTANT_VALUE
    return counts, names.astype(str)


def _cells_table(
    screen: SimulatedScreen, labels: list[str], rng: np.random.Generator
) -> pd.DataFrame:
    """One row per cell; perturbed cells get a target gene and one of its two guides."""
    n_cells = len(screen.cell_ids)
    genes = rng.choice(TARGET_GENES, size=n_cells)
    guide_no = rng.integers(1, 3, size=n_cells)
    target = np.where(screen.is_ntc, "ntc", genes)
    guide = np.where(
        screen.is_ntc,
        [f"ntc_{g}" for g in guide_no],
        [f"{gene}_{g}" for gene, g in zip(genes, guide_no, strict=True)],
    )
    return pd.DataFrame(
        {
            "cell": screen.cell_ids,
            "target": target,
            "guide": guide,
            "cell_line": np.asarray(labels)[screen.groups],
            "sum_factor": screen.sum_factor,
        }
    )


def _config(niters: int, nsamples: int, seed: int) -> dict:
    """The demo run: one negbinom modality with GFI1B as its cis feature."""
    return {
        "store": "results/run.zarr",
        "cells": "cells.csv",
        "covariates": ["cell_line"],
        "sum_factor_col": "sum_factor",
        "modalities": {
            "gene": {
                "distribution": "negbinom",
                "counts": "gene_counts.csv",
                "cis_feature": CIS_FEATURE,
            }
        },
        "fit": {"niters": niters, "nsamples": nsamples, "seed": seed},
    }
