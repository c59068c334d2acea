"""From a notebook: `flows.notebook.run` on an AnnData (or a MuData) in memory gives the
store the CLI gives on the same data written to files, refuses bad input with the flow's message
(writing nothing), and opens its results as xarray and as the exported AnnData."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
import zarr

from bayesdream_model.simulate import simulate_negbinom_screen
from flows.cli import main
from flows.notebook import RunResult, run
from tasks.errors import InputDataError
from tasks.store import results_key

N_CELLS, N_FEATURES, NSAMPLES = 90, 6, 10
LINES = np.array(["HEL", "K562", "TF1"])  # sorted: code order
FIT = {"niters": 60, "nsamples": NSAMPLES, "lr": 0.01}
POSTERIOR = ("alpha_y", "alpha_y_mult", "alpha_y_add", "log2_alpha_y", "mu_ntc", "phi_y")


def _screen() -> ad.AnnData:
    """A tiny all-NTC screen: raw counts in a CSR layer, log-normalised X, obs as the
    cells table (target, cell_line, sum_factor)."""
    sim = simulate_negbinom_screen(n_cells=N_CELLS, n_features=N_FEATURES, n_groups=3, seed=3)
    counts = sim.counts.T.astype(np.float32)  # cells x features
    obs = pd.DataFrame(
        {
            "target": pd.Categorical(["ntc"] * N_CELLS),
            "cell_line": pd.Categorical(LINES[sim.groups]),
            "sum_factor": sim.sum_factor,
        },
        index=pd.Index(sim.cell_ids),
    )
    return ad.AnnData(
        X=np.log1p(counts / sim.sum_factor[:, None]),
        obs=obs,
        var=pd.DataFrame(index=sim.feature_names),
        layers={"counts": sp.csr_matrix(counts)},
    )


def _cli_files(
    folder: Path, adata: ad.AnnData, covariates: list[str], name: str = "screen.h5ad"
) -> Path:
    """The same screen as a user's files: an .h5ad and a config naming it."""
    folder.mkdir()
    adata.write_h5ad(folder / name)
    config = {
        "store": "run.zarr",
        "cells": name,
        "covariates": covariates,
        "modalities": {"gene": {"distribution": "negbinom", "counts": name, "layer": "counts"}},
        "fit": FIT,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


def _run(adata: ad.AnnData, store: Path, covariates: list[str]) -> RunResult:
    return run(
        adata,
        store=store,
        covariates=covariates,
        modalities={"gene": {"distribution": "negbinom", "layer": "counts"}},
        fit=FIT,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, ad.AnnData]:
    adata = _screen()
    return _run(adata, tmp_path_factory.mktemp("notebook") / "run.zarr", ["cell_line"]), adata


def test_same_store_as_the_cli_on_files(fitted, tmp_path: Path) -> None:
    """Same bytes in (anndata writes identical files for identical objects), same config
    up to paths, same seed: the fingerprints and every posterior array are equal. The
    user's file gets the name run() gave its own: a file's name is part of its fingerprint."""
    result, adata = fitted
    config = _cli_files(tmp_path / "files", adata, ["cell_line"], name=result.inputs.name)
    assert main(["run", str(config)]) == 0
    cli = zarr.open_group(str(config.parent / "run.zarr"), mode="r")[results_key("gene")]
    ours = zarr.open_group(str(result.store), mode="r")[results_key("gene")]
    assert ours.attrs["fingerprint"] == cli.attrs["fingerprint"]
    assert ours.attrs["baseline_group"] == cli.attrs["baseline_group"] == "HEL"
    np.testing.assert_array_equal(ours["group_labels"][:], cli["group_labels"][:])
    for name in POSTERIOR:
        np.testing.assert_array_equal(ours[name][:], cli[name][:], err_msg=name)


def test_rerun_of_the_same_object_skips_every_step(fitted) -> None:
    result, adata = fitted
    group = zarr.open_group(str(result.store), mode="r")[results_key("gene")]
    before = (group.attrs["fingerprint"], group.attrs["fit_seconds"], group["alpha_y"][:])
    again = _run(adata.copy(), result.store, ["cell_line"])
    group = zarr.open_group(str(result.store), mode="r")[results_key("gene")]
    assert again.inputs == result.inputs and result.inputs.is_file()
    assert (group.attrs["fingerprint"], group.attrs["fit_seconds"]) == before[:2]
    np.testing.assert_array_equal(group["alpha_y"][:], before[2])
    assert sorted(p.name for p in result.inputs.parent.iterdir()) == [result.inputs.name]


def test_missing_covariate_same_message_as_the_cli_and_nothing_written(tmp_path: Path) -> None:
    adata = _screen()
    config = _cli_files(tmp_path / "files", adata, ["batch"])
    from flows.technical_fit import technical_fit

    with pytest.raises(InputDataError) as from_files:
        technical_fit(str(config))
    store = tmp_path / "nb" / "run.zarr"
    with pytest.raises(InputDataError) as from_memory:
        _run(adata, store, ["batch"])
    files_message = str(from_files.value).replace(str(config.parent / "screen.h5ad"), "FILE")
    ours, note = str(from_memory.value).split("\n(In run(): ")
    inputs = next(iter(ours.split("'")[1:2]))  # the message names the object's file first
    assert "missing column(s) ['batch']" in files_message
    assert ours.replace(inputs, "FILE") == files_message
    assert "obs is data.obs" in note and "`covariates:`" in note
    assert not store.exists() and not (tmp_path / "nb" / "run.zarr.inputs").exists()


def test_result_opens_as_xarray_and_anndata(fitted) -> None:
    result, adata = fitted
    ds = result.xarray("gene")
    assert ds.alpha_y.dims == ("draw", "group", "feature")
    assert list(ds.group.values) == list(LINES)
    assert list(ds.feature.values) == list(adata.var_names)
    assert ds.alpha_y.sel(feature=adata.var_names[1], group="K562").shape == (NSAMPLES,)
    effects = result.anndata("gene")
    assert list(effects.var_names) == list(adata.var_names)
    assert list(effects.varm["alpha_mean"].columns) == list(LINES)
    assert effects.uns["bayesdream"]["baseline_group"] == "HEL"
    np.testing.assert_allclose(
        effects.varm["alpha_mean"]["K562"].to_numpy(),
        ds.alpha_y_add.mean("draw").sel(group="K562").values,
        rtol=1e-5,
    )
    assert repr(result) == f"RunResult(store='{result.store}', modalities=['gene'])"
    assert result.page == result.store.with_name(f"{result.store.name}.reports") / "index.html"
    assert "<h2>Modality gene</h2>" in result.page.read_text()
    with pytest.raises(Exception, match=r"Modality 'adt' is not in this run's store"):
        result.xarray("adt")


def test_a_mudata_object_gives_the_clis_store_for_every_modality(tmp_path: Path) -> None:
    """MuData: the cells table is the global obs; `gene` (negbinom, a counts layer) and
    `adt` (normal, X) each get results equal to the CLI's on the same .h5mu file."""
    import mudata as md

    gene = _screen()
    rng = np.random.default_rng(5)
    shift = np.array([0.0, 0.5, -0.4])[pd.Categorical(gene.obs["cell_line"]).codes]
    adt = ad.AnnData(
        X=(rng.normal(2.0, 0.5, size=(N_CELLS, 3)) + shift[:, None]).astype(np.float32),
        obs=pd.DataFrame(index=gene.obs_names.copy()),
        var=pd.DataFrame(index=[f"CD{i}" for i in range(3)]),
    )
    mdata = md.MuData(
        {
            "gene": ad.AnnData(
                gene.layers["counts"].copy(),
                var=gene.var.copy(),
                obs=pd.DataFrame(index=gene.obs_names.copy()),
                layers={"counts": gene.layers["counts"].copy()},
            ),
            "adt": adt,
        }
    )
    for column in ("target", "cell_line", "sum_factor"):
        mdata.obs[column] = gene.obs[column].to_numpy()
    modalities = {"gene": {"layer": "counts"}, "adt": {"distribution": "normal"}}
    result = run(
        mdata,
        store=tmp_path / "nb" / "run.zarr",
        covariates=["cell_line"],
        modalities=modalities,
        fit=FIT,
    )
    assert result.inputs.suffix == ".h5mu" and result.modalities == ("gene", "adt")
    assert result.xarray("adt").alpha_y_add.dims == ("draw", "group", "feature")

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / result.inputs.name).write_bytes(result.inputs.read_bytes())
    config = {
        "store": "run.zarr",
        "cells": result.inputs.name,
        "covariates": ["cell_line"],
        "modalities": {
            name: {
                "counts": result.inputs.name,
                "modality": name,
                "distribution": spec.get("distribution", "negbinom"),
                **({"layer": spec["layer"]} if "layer" in spec else {}),
            }
            for name, spec in modalities.items()
        },
        "fit": FIT,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(folder / "config.yaml")]) == 0
    for name, arrays in (("gene", POSTERIOR), ("adt", ("alpha_y_add", "mu_ntc", "sigma_y"))):
        cli = zarr.open_group(str(folder / "run.zarr"), mode="r")[results_key(name)]
        ours = zarr.open_group(str(result.store), mode="r")[results_key(name)]
        assert ours.attrs["fingerprint"] == cli.attrs["fingerprint"], name
        for array in arrays:
            np.testing.assert_array_equal(ours[array][:], cli[array][:], err_msg=f"{name} {array}")
