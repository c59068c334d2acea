"""xarray (and ArviZ) read the store: dimension names on every array, names as coordinates."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from stores import npy_store

from tasks.sample.sampling import SampleRequest, sample_modality
from tasks.store import CIS_KEY, read_strings, results_key

NSAMPLES = 17  # tests/stores.py fits with this many draws in its config


def _sampled(folder: Path, distribution: str, n_groups: int, cis: str | None = None):
    root, sizes = npy_store(folder, distribution, n_groups)
    sample_modality(root, "m", SampleRequest(nsamples=NSAMPLES, cis_feature=cis))
    return root, str(folder / "run.zarr")


@pytest.fixture(scope="module")
def negbinom(tmp_path_factory: pytest.TempPathFactory) -> tuple[zarr.Group, str]:
    return _sampled(tmp_path_factory.mktemp("negbinom"), "negbinom", 3, cis="f1")


def _open(store: str, key: str) -> xr.Dataset:
    return xr.open_zarr(store, group=key, consolidated=False)


def test_results_open_as_a_labelled_dataset(negbinom) -> None:
    root, store = negbinom
    group = root[results_key("m")]
    ds = _open(store, "technical/m")
    assert ds.alpha_y.dims == ("draw", "group", "feature")
    assert ds.log2_alpha_y.dims == ("draw", "nonbaseline_group", "feature")
    assert ds.mu_ntc.dims == ("draw", "feature") and ds.beta_o.dims == ("draw",)
    assert ds.ntc_excluded_from_fit.dims == ("feature",) and ds.loss.dims == ("step",)
    names = read_strings(group, "feature_names")
    assert list(ds.feature.values) == list(names) == ["f0", "f2", "f3", "f4"]  # cis f1 out
    assert list(ds.group.values) == ["A", "B", "C"]
    assert list(ds.nonbaseline_group.values) == ["B", "C"]
    assert list(ds.draw.values) == list(range(NSAMPLES))
    picked = ds.alpha_y.sel(feature="f2", group="B").values
    np.testing.assert_array_equal(picked, group["alpha_y"][:, 1, 1])
    raw = ds.log2_alpha_y.sel(feature="f3", nonbaseline_group="C").values
    np.testing.assert_array_equal(raw, group["log2_alpha_y"][:, 1, 2])
    # the existing keys and attributes are all still there
    assert {"feature_names", "group_labels", "alpha_y_mult", "alpha_y_add"} <= set(ds.data_vars)
    assert ds.attrs["distribution"] == "negbinom" and ds.attrs["complete"] is True


def test_cis_group_and_inputs_are_labelled_too(negbinom) -> None:
    _, store = negbinom
    cis = _open(store, CIS_KEY)
    assert cis.alpha_x.dims == ("draw", "group")
    assert cis.log2_alpha_x.dims == ("draw", "nonbaseline_group")
    assert float(cis.alpha_x_mult.sel(group="A").max()) == 1.0  # the baseline
    inputs = _open(store, "inputs/m")
    assert inputs.counts.dims == ("feature", "cell")
    assert list(inputs.feature.values) == ["f0", "f1", "f2", "f3", "f4"]
    assert inputs.cell.values[0] == "c0"
    stored = np.load(Path(store).parent / "counts.npy")
    np.testing.assert_array_equal(inputs.counts.sel(feature="f3").values, stored[3])
    flags = _open(store, "prep/m")
    assert bool(flags.ntc_zero_count.sel(feature="f4")) is True


def _all_arrays(group: zarr.Group, prefix: str = ""):
    for name, array in group.arrays():
        yield f"{prefix}{name}", array
    for name, child in group.groups():
        yield from _all_arrays(child, f"{prefix}{name}/")


def test_every_array_in_the_store_names_its_dimensions(negbinom) -> None:
    root, store = negbinom
    arrays = dict(_all_arrays(root))
    assert len(arrays) > 30
    for key, array in arrays.items():
        dims = array.metadata.dimension_names
        if array.ndim == 0:  # a scalar (a prior input): zarr records no names for no axes
            continue
        assert dims is not None and len(dims) == array.ndim and all(dims), key
    groups = {key.rsplit("/", 1)[0] for key in arrays if "/" in key}
    for key in groups:  # every group with arrays opens as a Dataset
        assert len(_open(store, key).variables) > 0, key


def test_arviz_summary_of_the_results(negbinom) -> None:
    """The README's one-line conversion: a chain dimension and values in memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ announces its 1.0 refactor
        import arviz as az

    root, store = negbinom
    ds = xr.open_zarr(store, group="technical/m", consolidated=False)
    idata = az.convert_to_inference_data(ds[["alpha_y_add", "mu_ntc"]].expand_dims("chain").load())
    table = az.summary(idata, var_names=["alpha_y_add"], kind="stats")
    draws = root[results_key("m")]["alpha_y_add"][...].astype(np.float64)
    assert len(table) == 3 * 4
    np.testing.assert_allclose(
        table.loc["alpha_y_add[B, f2]", "mean"], draws[:, 1, 1].mean(), atol=1e-3
    )
    np.testing.assert_allclose(
        table.loc["alpha_y_add[C, f0]", "sd"], draws[:, 2, 0].std(ddof=1), atol=1e-3
    )


def test_multinomial_results_have_a_category_dimension(tmp_path: Path) -> None:
    root, store = _sampled(tmp_path, "multinomial", 2)
    ds = _open(store, "technical/m")
    assert ds.alpha_y.dims == ("draw", "group", "feature", "category")
    assert ds.probs_baseline.dims == ("draw", "feature", "category")
    assert list(ds.category.values) == [0, 1, 2]
    np.testing.assert_array_equal(
        ds.alpha_y.sel(group="B", feature="f1", category=2).values,
        root[results_key("m")]["alpha_y"][:, 1, 1, 2],
    )


def test_one_group_has_an_empty_nonbaseline_axis(tmp_path: Path) -> None:
    _, store = _sampled(tmp_path, "normal", 1)
    ds = _open(store, "technical/m")
    assert ds.sizes["group"] == 1 and ds.sizes["nonbaseline_group"] == 0
    assert ds.delta_y.dims == ("draw", "nonbaseline_group", "feature")
    assert list(ds.group.values) == ["all"]
