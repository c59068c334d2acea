"""Posterior sampling into preallocated Zarr arrays: layout, batches, excluded features, cis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from stores import npy_store

from bayesdream_model.distributions import get_family, is_3d
from bayesdream_model.memory import MemoryBudget, bytes_per_sample
from tasks.config import load_config
from tasks.demo import write_demo_inputs
from tasks.errors import StoreError
from tasks.filter.flags import filter_features
from tasks.fit.fitting import INPUT_ORDER, fit_modality, load_fitted
from tasks.groups import assign_groups_in_store, read_groups
from tasks.ingest import check_modality, ingest_modality, read_cells_table, write_cells
from tasks.results.summary import summarize
from tasks.sample import sampling
from tasks.sample.sampling import SampleRequest, feature_layout, sample_modality
from tasks.store import CIS_KEY, COMPLETE, data_arrays, open_root, read_strings, results_key

N_CELLS, N_FEATURES, N_GROUPS = 120, 12, 3
NSAMPLES = 40
SPLIT_BATCH = 12  # draws per batch under the faked memory budget: 12, 12, 12, 4


# -- feature_layout -------------------------------------------------------------------
NAMES = np.array(["A", "B", "C", "D", "E"])


def test_layout_without_cis_maps_fit_features_to_their_own_columns() -> None:
    layout = feature_layout(NAMES, np.array([0, 2, 3]), None)
    assert layout.n_results == 5 and layout.cis_fit_column is None
    np.testing.assert_array_equal(layout.fit_to_result, [0, 2, 3])


def test_layout_with_cis_takes_its_column_out() -> None:
    layout = feature_layout(NAMES, np.array([0, 2, 3]), "C")  # B and E excluded
    assert layout.n_results == 4 and layout.cis_fit_column == 1
    np.testing.assert_array_equal(layout.fit_to_result, [0, -1, 2])


def test_layout_with_an_excluded_cis_feature() -> None:
    layout = feature_layout(NAMES, np.array([0, 3, 4]), "C")
    assert layout.n_results == 4 and layout.cis_fit_column is None
    np.testing.assert_array_equal(layout.fit_to_result, [0, 2, 3])


def test_layout_with_cis_first_and_everything_fit() -> None:
    layout = feature_layout(NAMES, np.arange(5), "A")
    assert layout.n_results == 4 and layout.cis_fit_column == 0
    np.testing.assert_array_equal(layout.fit_to_result, [-1, 0, 1, 2, 3])


# -- the whole store path, without Prefect ------------------------------------------------
def _fitted_store(folder: Path, overrides: list[str]) -> zarr.Group:
    """Demo inputs ingested, grouped, filtered and fit (module functions, no Prefect)."""
    config = write_demo_inputs(
        folder,
        n_cells=N_CELLS,
        n_features=N_FEATURES,
        n_groups=N_GROUPS,
        niters=100,
        nsamples=NSAMPLES,
    )
    cfg = load_config(config, overrides)
    table = read_cells_table(cfg)
    plan = check_modality(cfg, "gene", table["cell"].to_numpy())
    root = open_root(cfg.store, create=True)
    write_cells(root, table, cfg.covariates, cfg.sum_factor_col)
    ingest_modality(root, cfg, "gene", plan)
    assign_groups_in_store(root, use_all_cells=False, policy="drop")
    filter_features(root, "gene", read_groups(root))
    fit_modality(root, "gene", cfg.fit)
    return root


@pytest.fixture(scope="module")
def cis_store(tmp_path_factory: pytest.TempPathFactory) -> zarr.Group:
    return _fitted_store(tmp_path_factory.mktemp("cis"), [])


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory: pytest.TempPathFactory) -> zarr.Group:
    return _fitted_store(tmp_path_factory.mktemp("plain"), ["modalities.gene.cis_feature=null"])


def _tiny_budget(monkeypatch: pytest.MonkeyPatch, root: zarr.Group) -> None:
    """A memory budget that holds SPLIT_BATCH draws, no more."""
    n_fit = int(root["fit/gene/features"].shape[0])
    n_cells = int(read_groups(root).fit.sum())
    usable = SPLIT_BATCH * bytes_per_sample(n_cells, n_fit, N_GROUPS) + 1
    budget = MemoryBudget(usable_bytes=usable, source="faked for the test", safety=1.0)
    monkeypatch.setattr(sampling, "sampling_budget", lambda device: budget)


def _spy_batches(monkeypatch: pytest.MonkeyPatch, root: zarr.Group) -> list[tuple]:
    """Record each batch, and the results' shape/chunks as they stand before the first."""
    seen: list[tuple] = []
    real = sampling.draw_range

    def spy(fitted, start, stop, *, seed, parallel):
        alpha = zarr.open_array(str(Path(root.store.root) / results_key("gene") / "alpha_y"))
        seen.append((start, stop, alpha.shape, alpha.chunks))
        return real(fitted, start, stop, seed=seed, parallel=parallel)

    monkeypatch.setattr(sampling, "draw_range", spy)
    return seen


def _sample(root: zarr.Group, cis: str | None) -> dict:
    return sample_modality(root, "gene", SampleRequest(nsamples=NSAMPLES, cis_feature=cis))


def _results(root: zarr.Group) -> dict[str, np.ndarray]:
    group = root[results_key("gene")]
    return {name: array[...] for name, array in data_arrays(group).items()}


def _check_results(root: zarr.Group, cis: str | None) -> dict[str, np.ndarray]:
    """Full shapes, baseline/NaN for excluded features, finite draws for fit features."""
    group = root[results_key("gene")]
    assert group.attrs[COMPLETE] is True
    truth = np.load(Path(root.store.root).parents[1] / "truth.npz")
    all_names = [str(n) for n in truth["feature_names"]]
    names = list(read_strings(group, "feature_names"))
    assert names == [n for n in all_names if n != cis]
    t, c, s = len(names), N_GROUPS, NSAMPLES
    res = _results(root)
    for key in ("alpha_y", "alpha_y_mult", "alpha_y_add"):
        assert res[key].shape == (s, c, t) and res[key].dtype == np.float32
    assert res["log2_alpha_y"].shape == (s, c - 1, t)
    for key in ("mu_ntc", "o_y", "phi_y"):
        assert res[key].shape == (s, t) and res[key].dtype == np.float32
    excluded = res["ntc_excluded_from_fit"]
    assert [names[i] for i in np.flatnonzero(excluded)] == sorted(
        [str(truth["zero_feature"]), str(truth["constant_feature"])], key=names.index
    )
    np.testing.assert_array_equal(res["technical_correction_applied"], ~excluded)
    assert (res["alpha_y_mult"][..., excluded] == 1).all()
    assert (res["alpha_y"][..., excluded] == 1).all()
    assert (res["alpha_y_add"][..., excluded] == 0).all()
    assert (res["log2_alpha_y"][..., excluded] == 0).all()
    for key in ("mu_ntc", "o_y", "phi_y"):
        assert np.isnan(res[key][..., excluded]).all()
        assert np.isfinite(res[key][..., ~excluded]).all()
        assert (res[key][..., ~excluded] > 0).all()
    for key in ("alpha_y", "alpha_y_mult", "alpha_y_add", "log2_alpha_y"):
        assert np.isfinite(res[key][..., ~excluded]).all()
    # the baseline group is fixed; alpha_y is the multiplicative effect for negbinom
    assert (res["alpha_y_mult"][:, 0] == 1).all() and (res["alpha_y_add"][:, 0] == 0).all()
    np.testing.assert_array_equal(res["alpha_y"], res["alpha_y_mult"])
    np.testing.assert_allclose(res["alpha_y_add"][:, 1:], res["log2_alpha_y"])
    np.testing.assert_allclose(np.exp2(res["alpha_y_add"]), res["alpha_y_mult"], rtol=1e-5)
    np.testing.assert_allclose(
        res["phi_y"][..., ~excluded], res["o_y"][..., ~excluded] ** -2.0, rtol=1e-4
    )
    return res


def test_batched_sampling_fills_full_size_arrays(
    cis_store: zarr.Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _sample(cis_store, "GFI1B")
    assert whole["batch_size"] == NSAMPLES
    one_draw = _check_results(cis_store, "GFI1B")
    one_cis = {k: a[...] for k, a in data_arrays(cis_store[CIS_KEY]).items()}

    _tiny_budget(monkeypatch, cis_store)
    seen = _spy_batches(monkeypatch, cis_store)
    split = _sample(cis_store, "GFI1B")
    assert split["batch_size"] == SPLIT_BATCH
    assert [(a, b) for a, b, *_ in seen] == [(0, 12), (12, 24), (24, 36), (36, 40)]
    full = (NSAMPLES, N_GROUPS, N_FEATURES - 1)
    assert all(shape == full and chunks[0] == SPLIT_BATCH for *_, shape, chunks in seen)
    group = cis_store[results_key("gene")]
    assert group.attrs["sampling_batch_size"] == SPLIT_BATCH
    assert group["mu_ntc"].chunks[0] == SPLIT_BATCH

    batched = _check_results(cis_store, "GFI1B")
    assert batched.keys() == one_draw.keys()
    for key, values in one_draw.items():
        assert batched[key].shape == values.shape and batched[key].dtype == values.dtype, key
    fit = batched["technical_correction_applied"]
    # same posterior, drawn in pieces: per-feature medians agree
    np.testing.assert_allclose(
        np.median(batched["mu_ntc"][:, fit], axis=0),
        np.median(one_draw["mu_ntc"][:, fit], axis=0),
        rtol=0.5,
    )
    cis = {k: a[...] for k, a in data_arrays(cis_store[CIS_KEY]).items()}
    assert cis.keys() == one_cis.keys()
    for key, values in cis.items():
        assert values.shape == one_cis[key].shape, key
        assert np.isfinite(values).all(), key
    assert cis_store[CIS_KEY].attrs[COMPLETE] is True


def test_cis_feature_results(cis_store: zarr.Group) -> None:
    _sample(cis_store, "GFI1B")
    cis = cis_store[CIS_KEY]
    s, c = NSAMPLES, N_GROUPS
    shapes = {name: array.shape for name, array in data_arrays(cis).items()}
    assert shapes == {
        "alpha_x": (s, c),
        "alpha_x_mult": (s, c),
        "alpha_x_add": (s, c),
        "log2_alpha_x": (s, c - 1),
        "mu_ntc": (s,),
        "o_x": (s,),
        "phi_x": (s,),
    }
    assert cis.attrs["feature"] == "GFI1B" and cis.attrs["modality"] == "gene"
    assert cis.attrs["technical_correction_applied"] is True
    alpha = cis["alpha_x_mult"][...]
    assert (alpha[:, 0] == 1).all() and (alpha > 0).all()
    np.testing.assert_allclose(cis["alpha_x_add"][:, 1:], cis["log2_alpha_x"][...])
    assert (cis["mu_ntc"][...] > 0).all()


def test_without_cis_every_feature_stays(plain_store: zarr.Group) -> None:
    _sample(plain_store, None)
    _check_results(plain_store, None)
    assert CIS_KEY not in plain_store


# -- every distribution, C = 1 and C = 3 ---------------------------------------------
@pytest.mark.parametrize("n_groups", [1, 3])
@pytest.mark.parametrize(
    "distribution", ["negbinom", "binomial", "multinomial", "normal", "studentt"]
)
def test_result_shapes_for_every_distribution(
    tmp_path: Path, distribution: str, n_groups: int
) -> None:
    root, dims = npy_store(tmp_path, distribution, n_groups)
    summary = sample_modality(
        root, "m", SampleRequest(nsamples=dims["S"], seed=1, minibatch_size=5)
    )
    assert summary["batch_size"] == 5  # batches 5, 5, 5, 2
    group = root[results_key("m")]
    assert group.attrs[COMPLETE] is True and group.attrs["distribution"] == distribution
    s, c, t = dims["S"], dims["C"], dims["T"]
    k = (3,) if is_3d(distribution) else ()
    excluded = group["ntc_excluded_from_fit"][...]
    assert excluded[-1] and not excluded[:-1].any()
    lead = {"effect": (c,), "raw": (c - 1,), "feature": ()}
    for out in get_family(distribution).outputs():
        values = group[out.name][...]
        if out.kind == "scalar":
            assert values.shape == (s,), out.name
            continue
        assert values.shape == (s, *lead[out.kind], t, *k), out.name
        assert values.dtype == np.float32 and group[out.name].chunks[0] == 5, out.name
        fit_part = np.moveaxis(values, out.feature_axis, 0)[:-1]
        excluded_part = np.moveaxis(values, out.feature_axis, 0)[-1]
        assert np.isfinite(fit_part).all(), out.name
        if out.kind == "feature":
            assert np.isnan(excluded_part).all(), out.name
        else:
            assert (excluded_part == (out.fill if out.kind == "effect" else 0.0)).all(), out.name
    assert {"alpha_y", "alpha_y_add"} <= set(group.array_keys())
    assert (group["alpha_y_add"][:, 0] == 0).all()  # baseline group
    table = summarize(str(Path(root.store.root)), "m")
    assert len(table) == c * t * (k[0] if k else 1)
    assert table["excluded"].sum() == c * (k[0] if k else 1)


def test_load_fitted_does_not_depend_on_the_store_listing_order(cis_store: zarr.Group) -> None:
    n_fit = int(cis_store["fit/gene/features"].shape[0])
    assert load_fitted(cis_store, "gene").n_features == n_fit
    inputs = cis_store["fit/gene/inputs"]
    order = list(inputs.attrs[INPUT_ORDER])
    assert set(order) == set(inputs.array_keys())
    try:
        del inputs.attrs[INPUT_ORDER]  # a store written before the order was recorded
        assert load_fitted(cis_store, "gene").n_features == n_fit
    finally:
        inputs.attrs[INPUT_ORDER] = order


def test_summary_of_a_modality_without_results_lists_the_others(cis_store: zarr.Group) -> None:
    _sample(cis_store, "GFI1B")
    with pytest.raises(StoreError, match=r"'technical/atac'.*Modalities with results: \['gene'\]"):
        summarize(str(Path(cis_store.store.root)), "atac")


def test_summary_refuses_the_cis_group(cis_store: zarr.Group) -> None:
    with pytest.raises(StoreError, match=r"'technical/cis' holds the cis feature's draws"):
        summarize(str(Path(cis_store.store.root)), "cis")


def test_out_of_memory_halves_the_batch_and_logs(
    monkeypatch: pytest.MonkeyPatch, plain_store: zarr.Group, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that runs out of memory is drawn again as two halves; nothing is lost."""
    real = sampling.draw_range
    failed: list[tuple[int, int]] = []

    def flaky(fitted, start, stop, *, seed, parallel):
        if stop - start > 5:
            failed.append((start, stop))
            raise MemoryError("simulated")
        return real(fitted, start, stop, seed=seed, parallel=parallel)

    monkeypatch.setattr(sampling, "draw_range", flaky)
    with caplog.at_level("WARNING"):
        sample_modality(
            plain_store, "gene", SampleRequest(nsamples=NSAMPLES, minibatch_size=NSAMPLES)
        )
    assert failed and failed[0] == (0, NSAMPLES)
    assert "Out of memory" in caplog.text and "retrying as" in caplog.text
    group = plain_store[results_key("gene")]
    assert group.attrs[COMPLETE] is True
    fit = ~group["ntc_excluded_from_fit"][...]
    assert np.isfinite(group["alpha_y_add"][...][..., fit]).all()
