"""The technical-fit flow end to end (through Prefect) and the `bayesdream` CLI."""

from __future__ import annotations

import logging
import re
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from flows.cli import main
from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.errors import ConfigError
from tasks.store import CIS_KEY, COMPLETE, data_arrays, results_key

NITERS, NSAMPLES = 100, 20
EFFECTS = ("alpha_y", "alpha_y_mult", "alpha_y_add")
PER_FEATURE = ("mu_ntc", "o_y", "phi_y")
FLAGS = (
    "ntc_zero_count",
    "ntc_zero_std",
    "ntc_single_category",
    "ntc_excluded_from_fit",
    "technical_correction_applied",
)
ATTRS = (
    "distribution",
    "effect_type",
    "guide",
    "device",
    "niters_run",
    "nsamples",
    "fit_seconds",
    "sampling_seconds",
    "complete",
)


def _demo(folder: Path, *, n_groups: int = 3, n_cells: int = 120, n_features: int = 10) -> Path:
    return write_demo_inputs(
        folder,
        n_cells=n_cells,
        n_features=n_features,
        n_groups=n_groups,
        niters=NITERS,
        nsamples=NSAMPLES,
    )


def _store(config: Path) -> Path:
    return config.parent / "results" / "run.zarr"


def _edit_config(config: Path, **changes) -> None:
    data = yaml.safe_load(config.read_text())
    data.update(changes)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def _claims_complete(store: Path) -> list[str]:
    """Every key of the store that says `complete: true` at root or results level."""
    if not (store / "zarr.json").exists():
        return []
    root = zarr.open_group(str(store), mode="r")
    claims = ["/"] if root.attrs.get(COMPLETE) else []
    if "technical" in root:
        claims += sorted(
            f"technical/{key}"
            for key, group in root["technical"].groups()
            if group.attrs.get(COMPLETE)
        )
    return claims


def _check_modality(root: zarr.Group, name: str, n_groups: int, names: list[str]) -> None:
    """Every result name of technical/<name>, with its shape and dtype."""
    group = root[results_key(name)]
    s, c, t = NSAMPLES, n_groups, len(names)
    for key in EFFECTS:
        assert group[key].shape == (s, c, t) and group[key].dtype == np.float32, key
    assert group["log2_alpha_y"].shape == (s, c - 1, t)
    for key in PER_FEATURE:
        assert group[key].shape == (s, t) and group[key].dtype == np.float32, key
    for key in FLAGS:
        assert group[key].shape == (t,) and group[key].dtype == np.bool_, key
    assert list(group["feature_names"][...]) == names
    assert group["group_labels"].shape == (c,)
    assert group["loss"].shape == (group.attrs["niters_run"],)
    assert np.isfinite(group["loss"][...]).all()
    for key in ATTRS:
        assert key in group.attrs, key
    assert group.attrs[COMPLETE] is True
    assert group.attrs["distribution"] == "negbinom"
    assert group.attrs["effect_type"] == "multiplicative"
    # the cap, or the short schedule's stop after a Laplace start (50 steps at the least)
    assert group.attrs["nsamples"] == NSAMPLES and 50 <= group.attrs["niters_run"] <= NITERS


def test_demo_run_writes_every_result(tmp_path: Path) -> None:
    config = _demo(tmp_path / "demo")
    store = technical_fit(str(config))
    assert Path(store) == _store(config).resolve()
    root = zarr.open_group(store, mode="r")
    assert root.attrs[COMPLETE] is True
    assert {"config", "provenance", "started", "finished", "steps"} <= set(root.attrs)

    truth = np.load(config.parent / "truth.npz")
    cis = str(truth["cis_feature"])
    names = [str(n) for n in truth["feature_names"] if str(n) != cis]
    _check_modality(root, "gene", 3, names)
    group = root[results_key("gene")]
    assert list(group["group_labels"][...]) == list(truth["group_labels"])

    excluded = group["ntc_excluded_from_fit"][...]
    zero, constant = (
        names.index(str(truth["zero_feature"])),
        names.index(str(truth["constant_feature"])),
    )
    assert group["ntc_zero_count"][zero] and group["ntc_zero_std"][zero]
    assert group["ntc_zero_std"][constant] and not group["ntc_zero_count"][constant]
    assert set(np.flatnonzero(excluded)) == {zero, constant}
    assert not group["ntc_single_category"][...].any()
    np.testing.assert_array_equal(group["technical_correction_applied"][...], ~excluded)
    assert (group["alpha_y_mult"][...][..., excluded] == 1).all()
    assert np.isnan(group["mu_ntc"][...][:, excluded]).all()
    assert np.isfinite(group["mu_ntc"][...][:, ~excluded]).all()

    cis_group = root[CIS_KEY]
    assert cis_group.attrs[COMPLETE] is True and cis_group.attrs["feature"] == cis
    shapes = {key: array.shape for key, array in data_arrays(cis_group).items()}
    assert shapes == {
        "alpha_x": (NSAMPLES, 3),
        "alpha_x_mult": (NSAMPLES, 3),
        "alpha_x_add": (NSAMPLES, 3),
        "log2_alpha_x": (NSAMPLES, 2),
        "mu_ntc": (NSAMPLES,),
        "o_x": (NSAMPLES,),
        "phi_x": (NSAMPLES,),
    }
    assert all(np.isfinite(array[...]).all() for array in data_arrays(cis_group).values())

    csv = tmp_path / "effects.csv"
    assert main(["summary", store, "--modality", "gene", "--out", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert list(table.columns) == [
        "feature",
        "group",
        "mean",
        "sd",
        "q05",
        "q50",
        "q95",
        "excluded",
        "baseline",
        "baseline_no_counts",
        "start_not_converged",
    ]
    assert len(table) == len(names) * 3
    assert not table.duplicated(["feature", "group"]).any()
    assert set(table["feature"]) == set(names) and set(table["group"]) == set(truth["group_labels"])
    baseline = table[table["group"] == truth["group_labels"][0]]
    assert (baseline[["mean", "q05", "q50", "q95"]] == 0).all().all()
    flagged = table.groupby("feature")["excluded"].first()
    assert set(flagged[flagged].index) == {names[zero], names[constant]}
    assert (table["q05"] <= table["q50"]).all() and (table["q50"] <= table["q95"]).all()


@pytest.mark.parametrize(
    "n_groups",
    # C = 3 in the fast tier (the model tests cover C = 1, 2, 3 without the flow)
    [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3],
)
def test_shapes_for_each_number_of_groups(tmp_path: Path, n_groups: int) -> None:
    config = _demo(tmp_path / "demo", n_groups=n_groups, n_cells=60, n_features=8)
    if n_groups == 1:
        _edit_config(config, covariates=[])
    root = zarr.open_group(technical_fit(str(config)), mode="r")
    assert root.attrs[COMPLETE] is True
    truth = np.load(config.parent / "truth.npz")
    names = [str(n) for n in truth["feature_names"] if str(n) != "GFI1B"]
    _check_modality(root, "gene", n_groups, names)
    assert root[CIS_KEY]["alpha_x"].shape == (NSAMPLES, n_groups)
    assert root[CIS_KEY]["log2_alpha_x"].shape == (NSAMPLES, n_groups - 1)
    if n_groups == 1:
        assert (root[results_key("gene")]["alpha_y"][...] == 1).all()


def test_unknown_modality_is_a_config_error(tmp_path: Path) -> None:
    config = _demo(tmp_path / "demo", n_cells=60, n_features=8)
    with pytest.raises(ConfigError, match=r"--modality 'atac' is not in the config.*'gene'"):
        technical_fit(str(config), modality="atac")


# -- the CLI ---------------------------------------------------------------------------
def test_cli_run_with_overrides(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _demo(tmp_path / "demo", n_cells=60, n_features=8)
    with caplog.at_level(logging.INFO, logger="bayesdream"):
        status = main(["run", str(config), "--set", "fit.niters=50", "--set", "fit.nsamples=10"])
    assert status == 0
    root = zarr.open_group(str(_store(config)), mode="r")
    assert root.attrs[COMPLETE] is True
    assert root[results_key("gene")].attrs["niters_run"] == 50
    assert root[results_key("gene")]["alpha_y"].shape[0] == 10
    assert any(str(_store(config).resolve()) in r.getMessage() for r in caplog.records)


def test_cli_invalid_key_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _demo(tmp_path / "demo", n_cells=60, n_features=8)
    with caplog.at_level(logging.ERROR, logger="bayesdream"):
        status = main(["run", str(config), "--set", "fit.nitres=50"])
    assert status == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        re.search(r"unknown key\(s\): fit\.nitres \(did you mean fit\.niters\?\)", e)
        for e in errors
    )
    assert _claims_complete(_store(config)) == []


def test_cli_summary_of_a_missing_modality_exits_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="bayesdream"):
        status = main(["summary", str(tmp_path / "none.zarr"), "--modality", "gene"])
    assert status == 2
    assert any("No bayesdream store" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_cli_demo_recovers_the_simulated_effects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The full-size demo (about 30 s): effects drawn from the model are recovered."""
    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    store = tmp_path / "demo" / "results" / "run.zarr"
    truth = np.load(tmp_path / "demo" / "truth.npz")
    capsys.readouterr()
    assert main(["summary", str(store), "--modality", "gene"]) == 0
    table = pd.read_csv(StringIO(capsys.readouterr().out))
    table = table[~table["excluded"] & (table["group"] != truth["group_labels"][0])]
    all_names = [str(n) for n in truth["feature_names"]]
    labels = [str(label) for label in truth["group_labels"]]
    expected = truth["log2_alpha"][
        [labels.index(g) for g in table["group"]], [all_names.index(f) for f in table["feature"]]
    ]
    assert np.corrcoef(expected, table["mean"])[0, 1] > 0.9
    covered = (table["q05"] <= expected) & (expected <= table["q95"])
    assert covered.mean() > 0.6
