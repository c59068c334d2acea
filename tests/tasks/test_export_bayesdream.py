"""`bayesdream export STORE --to bayesdream DIR`: the files the reference bayesDREAM's
`load_technical_fit(input_dir=DIR)` reads, holding the store's draws on its scale, in its
group order and feature list."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr
from stores import matrix_values

from flows.cli import main
from tasks.config import load_config
from tasks.errors import PipelineError, StoreError
from tasks.filter.flags import filter_features
from tasks.fit.fitting import fit_modality
from tasks.groups import assign_groups_in_store, read_groups
from tasks.ingest import check_modality, ingest_modality, read_cells_table, write_cells
from tasks.results.export_bayesdream import (
    ALPHA_X_FILE,
    COMPARED,
    alpha_y_file,
    export_bayesdream,
    features_file,
    reference_order,
)
from tasks.sample.sampling import SampleRequest, sample_modality
from tasks.store import CIS_KEY, COMPLETE, open_root, results_key

S, N_CELLS, N_NTC = 17, 90, 72
FEATURES = [f"f{t}" for t in range(6)]


def _run(folder: Path, distribution: str, *, baseline: str | None = None, cis: str | None = None):
    """A screen of 72 NTC and 18 'f0'-target cells in lines A, B, C, ingested, fit and
    sampled: f1 is constant in the NTC cells only (excluded from the fit, kept by
    bayesDREAM), f5 constant in every cell (dropped by bayesDREAM)."""
    rng = np.random.default_rng(5)
    cells = [f"c{i}" for i in range(N_CELLS)]
    pd.DataFrame(
        {
            "cell": cells,
            "target": np.where(np.arange(N_CELLS) < N_NTC, "ntc", "f0"),
            "cell_line": np.array(["A", "B", "C"])[np.arange(N_CELLS) % 3],
            "sum_factor": rng.lognormal(0.0, 0.2, N_CELLS),
        }
    ).to_csv(folder / "cells.csv", index=False)
    (folder / "features.txt").write_text("\n".join(FEATURES))
    (folder / "cells.txt").write_text("\n".join(cells))
    values = matrix_values(distribution, rng, (len(FEATURES), N_CELLS))
    values["counts"][1, :N_NTC] = 0.0 if distribution != "normal" else 2.0
    modality = {"distribution": distribution, "features": "features.txt", "cells": "cells.txt"}
    for key, array in values.items():
        np.save(folder / f"{key}.npy", array)
        modality[key] = f"{key}.npy"
    if cis is not None:
        modality["cis_feature"] = cis
    config = {
        "store": "run.zarr",
        "cells": "cells.csv",
        "covariates": ["cell_line"],
        "baseline_group": baseline,
        "modalities": {"m": modality},
        "fit": {"niters": 50, "nsamples": S},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(folder / "config.yaml")
    table = read_cells_table(cfg)
    root = open_root(cfg.store, create=True)
    write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    ingest_modality(root, cfg, "m", check_modality(cfg, "m", table["cell"].to_numpy()))
    assign_groups_in_store(root, use_all_cells=False, policy="drop", baseline=baseline)
    filter_features(root, "m", read_groups(root))
    fit_modality(root, "m", cfg.fit)
    sample_modality(root, "m", SampleRequest(nsamples=S, cis_feature=cis))
    return root, str(folder / "run.zarr")


@pytest.fixture(scope="module")
def cis_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[zarr.Group, str]:
    """negbinom with cis feature f0, baseline A (the first in sorted order)."""
    return _run(tmp_path_factory.mktemp("cis"), "negbinom", cis="f0")


@pytest.fixture(scope="module")
def named_cis_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[zarr.Group, str]:
    """The same screen with `baseline_group: C` (sorts last): our codes C, A, B."""
    return _run(tmp_path_factory.mktemp("named"), "negbinom", baseline="C", cis="f0")


def _load(path: Path) -> np.ndarray:
    tensor = torch.load(path)  # as the reference loads it: bare, CPU
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert tensor.device.type == "cpu"
    return tensor.numpy()


def _features(out: Path, modality: str = "m") -> list[str]:
    return (out / features_file(modality)).read_text().split()


def test_negbinom_hand_off_is_the_stored_multiplicative_draws(cis_run, tmp_path: Path) -> None:
    root, store = cis_run
    out = tmp_path / "handoff"
    assert main(["export", store, "--to", "bayesdream", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ALPHA_X_FILE,
        alpha_y_file("m"),
        features_file("m"),
    ]
    group = root[results_key("m")]
    assert list(group["feature_names"][...]) == FEATURES[1:]  # cis feature f0 not among them
    assert _features(out) == ["f1", "f2", "f3", "f4"]  # f5, constant in every cell, dropped
    alpha = _load(out / alpha_y_file("m"))
    assert alpha.shape == (S, 3, 4)
    np.testing.assert_array_equal(alpha, group["alpha_y_mult"][:, :, :4])
    np.testing.assert_allclose(alpha, np.exp2(group["alpha_y_add"][:, :, :4]), rtol=1e-6)
    assert (alpha[:, 0] == 1.0).all()  # the baseline row
    assert group["ntc_excluded_from_fit"][0] and not group["ntc_excluded_from_fit"][1]
    assert (alpha[:, :, 0] == 1.0).all()  # f1, excluded by our filters: kept, at baseline
    assert (alpha[:, 1:, 1:] != 1.0).all()  # fitted features: draws, not fill
    alpha_x = _load(out / ALPHA_X_FILE)
    assert alpha_x.shape == (S, 3) and (alpha_x[:, 0] == 1.0).all()
    np.testing.assert_array_equal(alpha_x, root[CIS_KEY]["alpha_x_mult"][...])


def test_named_baseline_is_reordered_and_rereferenced(named_cis_run, tmp_path: Path) -> None:
    root, store = named_cis_run
    group, cis = root[results_key("m")], root[CIS_KEY]
    assert list(group["group_labels"][...]) == ["C", "A", "B"]
    summary = export_bayesdream(store, tmp_path / "out")
    assert summary["groups"] == ["A", "B", "C"] and summary["reordered"]
    alpha = _load(tmp_path / "out" / alpha_y_file("m"))
    log2 = group["alpha_y_add"][:, :, :4].astype(np.float64)  # our codes: C, A, B
    expected = np.exp2(log2[:, [1, 2, 0]] - log2[:, [1]])  # bayesDREAM's: A, B, C; A = 1
    np.testing.assert_allclose(alpha, expected, rtol=1e-5)
    assert (alpha[:, 0] == 1.0).all() and (alpha[:, :, 0] == 1.0).all()
    # C's effect against A is the inverse of A's against C
    np.testing.assert_allclose(alpha[:, 2, 1:], 1.0 / group["alpha_y_mult"][:, 1, 1:4], rtol=1e-5)
    log2_x = cis["alpha_x_add"][...].astype(np.float64)
    np.testing.assert_allclose(
        _load(tmp_path / "out" / ALPHA_X_FILE),
        np.exp2(log2_x[:, [1, 2, 0]] - log2_x[:, [1]]),
        rtol=1e-5,
    )


def test_additive_effects_are_rereferenced_by_subtraction(tmp_path: Path) -> None:
    root, store = _run(tmp_path, "normal", baseline="B")
    group = root[results_key("m")]
    assert list(group["group_labels"][...]) == ["B", "A", "C"]
    assert (
        main(["export", store, "--to", "bayesdream", str(tmp_path / "out"), "--modality", "m"]) == 0
    )
    assert not (tmp_path / "out" / ALPHA_X_FILE).exists()  # no cis feature in this run
    assert _features(tmp_path / "out") == FEATURES[:5]
    alpha = _load(tmp_path / "out" / alpha_y_file("m"))
    add = group["alpha_y_add"][:, :, :5]
    np.testing.assert_allclose(alpha, add[:, [1, 0, 2]] - add[:, [1]], atol=1e-6)
    assert (alpha[:, 0] == 0.0).all() and (alpha[:, :, 1] == 0.0).all()  # baseline; excluded
    np.testing.assert_allclose(alpha[:, 1], -add[:, 1], atol=1e-6)  # B against A = -(A - B)


def test_multinomial_keeps_the_category_axis(tmp_path: Path) -> None:
    root, store = _run(tmp_path, "multinomial")
    export_bayesdream(store, tmp_path / "out")
    alpha = _load(tmp_path / "out" / alpha_y_file("m"))
    assert alpha.shape == (S, 3, 5, 3)  # f5 (no count anywhere) dropped
    np.testing.assert_array_equal(alpha, root[results_key("m")]["alpha_y_add"][:, :, :5])
    assert (alpha[:, 0] == 0.0).all() and (alpha[:, :, 1] == 0.0).all()


def test_reference_order_sorts_like_pandas_groupby() -> None:
    rows = [("10", "x"), ("9", "x"), ("9", "a"), ("10", "b")]
    frame = pd.DataFrame({"n": [10, 9, 9, 10], "s": ["x", "x", "a", "b"], "row": range(4)})
    codes = frame.groupby(["n", "s"]).ngroup()  # what bayesDREAM's set_technical_groups does
    assert list(reference_order(rows)) == list(np.argsort(codes.to_numpy()))
    assert list(reference_order([("K562",), ("HEL",), ("TF1",)])) == [1, 0, 2]
    assert list(reference_order([()])) == [0]


def test_binomial_compares_the_ratio_where_there_is_a_denominator() -> None:
    y, n = np.array([[1.0, 2.0, 0.0], [1.0, 3.0, 0.0]]), np.array([[2.0, 4.0, 0.0]] * 2)
    ratio = COMPARED["binomial"](y, n)
    assert np.isnan(ratio[:, 2]).all() and ratio[0, 0] == ratio[0, 1] and ratio[1, 0] != ratio[1, 1]


def test_errors_name_the_store_key_and_write_nothing(cis_run, tmp_path: Path, caplog) -> None:
    _, store = cis_run
    out = tmp_path / "out"
    with pytest.raises(StoreError, match=r"technical/nope.*Modalities with results: \['m'\]"):
        export_bayesdream(store, out, modalities=["nope"])
    with pytest.raises(StoreError, match="'technical/cis' holds the cis feature"):
        export_bayesdream(store, out, modalities=["cis"])
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    del zarr.open_group(str(copy / "technical" / "cis"), mode="a").attrs[COMPLETE]
    with pytest.raises(StoreError, match="Store key 'technical/cis' .* is missing or incomplete"):
        export_bayesdream(str(copy), out)
    with pytest.raises(StoreError, match="No bayesdream store"):
        export_bayesdream(str(tmp_path / "none.zarr"), out)
    with caplog.at_level(logging.ERROR):
        assert main(["export", store, "--to", "anndata", str(out)]) == 2
        assert (
            main(
                [
                    "export",
                    store,
                    "--modality",
                    "m",
                    "--modality",
                    "m",
                    "--out",
                    str(tmp_path / "e.csv"),
                ]
            )
            == 2
        )
    assert "the only target is 'bayesdream'" in caplog.text
    assert "give exactly one --modality" in caplog.text
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr"]


def test_an_earlier_export_is_replaced_and_other_files_refused(cis_run, tmp_path: Path) -> None:
    _, store = cis_run
    out = tmp_path / "out"
    out.mkdir()
    (out / alpha_y_file("old")).write_bytes(b"stale")
    export_bayesdream(store, out)
    assert sorted(p.name for p in out.iterdir()) == [
        ALPHA_X_FILE,
        alpha_y_file("m"),
        features_file("m"),
    ]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match=r"holds files that are not an earlier export \(notes"):
        export_bayesdream(store, out)
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
