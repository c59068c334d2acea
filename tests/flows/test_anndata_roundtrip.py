"""From AnnData to effects and back: one .h5mu feeds the flow, xarray reads the store,
`bayesdream export` writes effects whose var_names are the screen's."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import xarray as xr
import yaml

from bayesdream_model.simulate import simulate_negbinom_screen
from flows.cli import main
from flows.technical_fit import technical_fit

#: the end-to-end tier: h5ad / MuData in, the whole flow, xarray and AnnData out
pytestmark = pytest.mark.slow

N_CELLS, N_GROUPS, NSAMPLES = 120, 3, 20
LINES = np.array(["HEL", "K562", "TF1"])  # sorted: code order


def _write_screen(folder: Path) -> tuple[Path, ad.AnnData]:
    """rna (raw counts in a CSR layer, log-normalised X) and adt (continuous scores) in one
    MuData file, the cells table in its global obs; a config reading it as it is."""
    import mudata as md

    gene = simulate_negbinom_screen(n_cells=N_CELLS, n_features=8, n_groups=N_GROUPS, seed=5)
    counts = gene.counts.T.astype(np.float32)  # cells x features
    obs = pd.DataFrame(
        {
            "target": pd.Categorical(["ntc"] * N_CELLS),
            "cell_line": pd.Categorical(LINES[gene.groups]),
            "sum_factor": gene.sum_factor,
        },
        index=pd.Index(gene.cell_ids),
    )
    rna = ad.AnnData(
        X=np.log1p(counts / gene.sum_factor[:, None]),
        obs=pd.DataFrame(index=obs.index),
        var=pd.DataFrame(index=gene.feature_names),
        layers={"counts": sp.csr_matrix(counts)},
    )
    rng = np.random.default_rng(5)
    shift = np.array([0.0, 1.0, -1.0])[gene.groups][:, None]
    adt = ad.AnnData(
        X=(rng.normal(size=(N_CELLS, 4)) + shift).astype(np.float32),
        obs=pd.DataFrame(index=obs.index),
        var=pd.DataFrame(index=[f"CD{i}" for i in range(4)]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mudata 0.3: pull_on_update
        mdata = md.MuData({"rna": rna, "adt": adt})
        for column in obs.columns:
            mdata.obs[column] = obs[column].to_numpy()
        mdata.write(folder / "screen.h5mu")
    config = {
        "store": "run.zarr",
        "cells": "screen.h5mu",
        "covariates": ["cell_line"],
        "modalities": {
            "gene": {
                "distribution": "negbinom",
                "counts": "screen.h5mu",
                "modality": "rna",
                "layer": "counts",
            },
            "adt": {"distribution": "normal", "counts": "screen.h5mu", "modality": "adt"},
        },
        "fit": {"niters": 150, "nsamples": NSAMPLES, "lr": 0.01},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml", rna


def test_mudata_in_xarray_and_anndata_out(tmp_path: Path) -> None:
    config, rna = _write_screen(tmp_path)
    store = technical_fit(str(config))
    gene = xr.open_zarr(store, group="technical/gene", consolidated=False)
    assert gene.alpha_y.dims == ("draw", "group", "feature")
    assert list(gene.group.values) == list(LINES)
    assert list(gene.feature.values) == list(rna.var_names)
    assert gene.alpha_y.sel(feature=rna.var_names[2], group="K562").shape == (NSAMPLES,)
    adt = xr.open_zarr(store, group="technical/adt", consolidated=False)
    shift = adt.alpha_y.mean("draw").sel(group=["K562", "TF1"]).mean("feature").values
    assert shift[0] > 0.2 and shift[1] < -0.2  # the simulated shifts, +1 and -1

    out = tmp_path / "effects.h5ad"
    assert main(["export", store, "--modality", "gene", "--out", str(out)]) == 0
    effects = ad.read_h5ad(out)
    # ... and back: the effects line up with the screen's own features
    rna.varm["technical_log2_mean"] = effects.varm["alpha_mean"].reindex(rna.var_names)
    np.testing.assert_allclose(
        rna.varm["technical_log2_mean"]["K562"].to_numpy(),
        gene.alpha_y_add.mean("draw").sel(group="K562").values,
        rtol=1e-5,
    )
