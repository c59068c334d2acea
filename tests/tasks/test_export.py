"""AnnData out: `bayesdream export` writes effects an AnnData (or a table) reads back."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from stores import npy_store

from flows.cli import main
from tasks.config import load_config
from tasks.filter.flags import filter_features
from tasks.fit.fitting import fit_modality
from tasks.groups import FIRST_SORTED, NAMED, assign_groups_in_store, read_groups
from tasks.results.summary import summarize
from tasks.sample.sampling import SampleRequest, sample_modality
from tasks.store import results_key

VARM = ("alpha_mean", "alpha_sd", "alpha_q05", "alpha_q95")


def _sampled(folder: Path, distribution: str, n_groups: int) -> tuple[zarr.Group, str]:
    root, _ = npy_store(folder, distribution, n_groups)
    sample_modality(root, "m", SampleRequest(nsamples=17))
    return root, str(folder / "run.zarr")


@pytest.fixture(scope="module")
def negbinom(tmp_path_factory: pytest.TempPathFactory) -> tuple[zarr.Group, str]:
    return _sampled(tmp_path_factory.mktemp("export"), "negbinom", 3)


@pytest.fixture(scope="module")
def named_baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[zarr.Group, str]:
    """The negbinom store of groups A, B, C refit with `baseline_group: C` (sorts last)."""
    folder = tmp_path_factory.mktemp("baseline")
    root, _ = npy_store(folder, "negbinom", 3)
    cfg = load_config(folder / "config.yaml")
    assign_groups_in_store(root, use_all_cells=False, policy="drop", baseline="C")
    filter_features(root, "m", read_groups(root))
    fit_modality(root, "m", cfg.fit)
    sample_modality(root, "m", SampleRequest(nsamples=17))
    return root, str(folder / "run.zarr")


def test_h5ad_var_is_the_features_and_varm_the_effects(negbinom, tmp_path: Path) -> None:
    root, store = negbinom
    out = tmp_path / "effects.h5ad"
    assert main(["export", store, "--modality", "m", "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 0 and list(adata.var_names) == ["f0", "f1", "f2", "f3", "f4"]
    group = root[results_key("m")]
    for flag in ("ntc_zero_count", "ntc_excluded_from_fit", "technical_correction_applied"):
        np.testing.assert_array_equal(adata.var[flag].to_numpy(), group[flag][...])
    assert bool(adata.var.loc["f4", "ntc_excluded_from_fit"]) is True
    assert set(VARM) <= set(adata.varm)
    log2 = group["alpha_y_add"][...].astype(np.float64)  # [S, C, T], the summary's scale
    for key in VARM:
        frame = adata.varm[key]
        assert list(frame.columns) == ["A", "B", "C"] and list(frame.index) == list(adata.var_names)
    np.testing.assert_allclose(adata.varm["alpha_mean"].to_numpy(), log2.mean(axis=0).T)
    np.testing.assert_allclose(adata.varm["alpha_sd"].to_numpy(), log2.std(axis=0, ddof=1).T)
    np.testing.assert_allclose(
        adata.varm["alpha_q95"].loc["f2", "C"], np.quantile(log2[:, 2, 2], 0.95)
    )
    assert (adata.varm["alpha_mean"]["A"] == 0).all()  # the baseline group
    info = adata.uns["bayesdream"]
    assert info["scale"] == "log2" and info["modality"] == "m"
    assert info["distribution"] == "negbinom" and info["baseline_group"] == "A"


def test_varm_agrees_with_the_summary_table(negbinom, tmp_path: Path) -> None:
    _, store = negbinom
    out = tmp_path / "effects.h5ad"
    main(["export", store, "--modality", "m", "--out", str(out)])
    adata = ad.read_h5ad(out)
    table = summarize(store, "m")
    wide = table.pivot(index="feature", columns="group", values="q05")
    pd.testing.assert_frame_equal(
        adata.varm["alpha_q05"], wide.loc[adata.var_names], check_names=False
    )


@pytest.mark.parametrize(("fmt", "suffix"), [("parquet", ".parquet"), ("csv", ".csv")])
def test_tables_are_the_summary(negbinom, tmp_path: Path, fmt: str, suffix: str) -> None:
    _, store = negbinom
    by_suffix, by_flag = tmp_path / f"effects{suffix}", tmp_path / "effects.out"
    assert main(["export", store, "--modality", "m", "--out", str(by_suffix)]) == 0
    assert main(["export", store, "--modality", "m", "--out", str(by_flag), "--format", fmt]) == 0
    read = pd.read_parquet if fmt == "parquet" else pd.read_csv
    expected = summarize(store, "m")
    for path in (by_suffix, by_flag):
        pd.testing.assert_frame_equal(read(path), expected, check_dtype=False)


def test_multinomial_columns_are_group_and_category(tmp_path: Path) -> None:
    root, store = _sampled(tmp_path, "multinomial", 2)
    out = tmp_path / "donor.h5ad"
    assert main(["export", store, "--modality", "m", "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    frame = adata.varm["alpha_mean"]
    assert list(frame.columns) == ["A:0", "A:1", "A:2", "B:0", "B:1", "B:2"]
    logits = root[results_key("m")]["alpha_y_add"][...].astype(np.float64)  # [S, C, T, K]
    np.testing.assert_allclose(frame.loc["f1", "B:2"], logits[:, 1, 1, 2].mean())
    assert adata.uns["bayesdream"]["scale"] == "logit"


def test_export_errors_say_what_to_do(negbinom, tmp_path: Path, caplog) -> None:
    _, store = negbinom
    with caplog.at_level(logging.ERROR):
        assert main(["export", store, "--modality", "m", "--out", str(tmp_path / "e.txt")]) == 2
    assert "name it .h5ad, .parquet or .csv, or give --format" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["export", store, "--modality", "gene", "--out", str(tmp_path / "e.h5ad")]) == 2
    assert "technical/gene" in caplog.text and "Modalities with results: ['m']" in caplog.text
    assert not (tmp_path / "e.h5ad").exists()


@pytest.mark.parametrize(("fixture", "baseline"), [("negbinom", "A"), ("named_baseline", "C")])
def test_summary_marks_the_baseline_rows(
    request: pytest.FixtureRequest, fixture: str, baseline: str
) -> None:
    root, store = request.getfixturevalue(fixture)
    assert root[results_key("m")].attrs["baseline_group"] == baseline
    table = summarize(store, "m")
    assert table.columns[-4:].tolist() == [  # every column kept, the new ones after
        "excluded",
        "baseline",
        "baseline_no_counts",
        "start_not_converged",
    ]
    assert table["baseline"].dtype == bool
    pd.testing.assert_series_equal(table["baseline"], table["group"] == baseline, check_names=False)
    assert table["baseline"].sum() == 5  # one row per feature
    assert (table.loc[table["baseline"], ["mean", "q05", "q95"]] == 0).all().all()
    assert not (table.loc[~table["baseline"] & ~table["excluded"], "sd"] == 0).any()
    assert table.attrs["baseline_group"] == baseline


def test_exports_name_the_named_baseline(named_baseline, tmp_path: Path) -> None:
    root, store = named_baseline
    assert list(root[results_key("m")]["group_labels"][...]) == ["C", "A", "B"]
    out = tmp_path / "effects.h5ad"
    assert main(["export", store, "--modality", "m", "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    info = adata.uns["bayesdream"]
    assert info["baseline_group"] == "C" and info["baseline_rule"] == NAMED
    assert list(adata.varm["alpha_mean"].columns) == ["C", "A", "B"]
    assert (adata.varm["alpha_mean"]["C"] == 0).all()
    csv = tmp_path / "effects.csv"
    assert main(["export", store, "--modality", "m", "--out", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert table["baseline"].dtype == bool
    assert set(table.loc[table["baseline"], "group"]) == {"C"}


def test_export_of_the_default_baseline_says_sorted_order(negbinom, tmp_path: Path) -> None:
    _, store = negbinom
    out = tmp_path / "effects.h5ad"
    assert main(["export", store, "--modality", "m", "--out", str(out)]) == 0
    info = ad.read_h5ad(out).uns["bayesdream"]
    assert info["baseline_group"] == "A" and info["baseline_rule"] == FIRST_SORTED
