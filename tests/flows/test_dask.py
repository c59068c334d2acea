"""The flow and the filter statistics on a real `distributed` cluster (loopback only).

One scheduler and two single-threaded worker PROCESSES serve the whole module, as
`bayesdream run --dask local` starts them. Process workers run Prefect tasks, so they must
report to a real Prefect API: otherwise each would start its own temporary server (slow, and
the task runs would land in separate databases). The session's `prefect_test_harness`
(tests/flows/conftest.py) already is such a server, a uvicorn subprocess on 127.0.0.1, so
the workers are pointed at it with PREFECT_API_URL (no second server to start and stop).
Worker threads in this process would have needed no server, but would not show that tasks
and their arguments survive pickling into another process, nor run the two modalities'
chains with a torch RNG each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from distributed import Client, LocalCluster, get_task_stream

from bayesdream_model.distributions import FilterFlags, get_family
from flows.cli import main
from flows.technical_fit import with_dask
from tasks.demo import write_demo_inputs
from tasks.filter.distributed import _feature_blocks, dask_flags
from tasks.filter.flags import filter_features, read_flags
from tasks.groups import GroupAssignment, assign_groups, read_groups
from tasks.selection import read_fit_arrays
from tasks.store import (
    CELLS,
    COMPLETE,
    fresh_group,
    inputs_key,
    open_root,
    results_key,
    write_array,
    write_strings,
)

#: the end-to-end tier: a real Dask cluster on loopback
pytestmark = pytest.mark.slow

N_CELLS, N_FEATURES = 90, 11
STORE_CHUNKS = (4, 16)  # several chunks along both axes, none aligned with a feature block


@pytest.fixture(scope="module")
def cluster(prefect_api: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """2 worker processes x 1 thread on 127.0.0.1, reporting to the harness's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    env = {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        env=env,
    ) as local:
        yield local


def _task_prefixes(client: Client) -> set[str]:
    """Every task name prefix the scheduler has seen."""
    return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))


# -- (a) dask_flags == the in-memory flags -------------------------------------------------
def _demo_screen(folder: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Demo counts [T, N] (with an all-zero and a constant feature) and its cells table."""
    config = write_demo_inputs(folder, n_cells=N_CELLS, n_features=N_FEATURES, n_groups=3)
    cells = pd.read_csv(config.parent / "cells.csv", dtype={"cell_line": str})
    counts = pd.read_csv(config.parent / "gene_counts.csv", index_col=0).to_numpy(np.float32)
    return counts, cells


def _family_data(family: str, counts: np.ndarray, groups: np.ndarray, rng) -> dict:
    """Demo-like matrices of `family` with features planted on each filter's edge."""
    fit_group = np.where(groups == 1)[0]
    if family == "negbinom":
        return {"counts": counts}
    if family == "binomial":
        n = counts.copy()
        y = rng.binomial(n.astype(np.int64), 0.3).astype(np.float32)
        n[0] = 0  # no valid cell
        y[1] = n[1]  # PSI 1 everywhere
        y[2][fit_group] = 0  # PSI 0 in one group
        n[3], y[3] = 2 * (n[3] + 1), n[3] + 1  # constant ratio 0.5
        return {"counts": y, "denominator": n}
    if family == "normal":
        y = np.log1p(counts) + rng.normal(0, 0.1, counts.shape).astype(np.float32)
        y[rng.random(y.shape) < 0.1] = np.nan
        y[0] = 0.1  # constant, not exactly representable: the sums' order shows
        y[1] = np.nan  # nothing observed
        y[2][fit_group] = np.nan  # all missing in one group
        return {"counts": y}
    if family == "multinomial":
        k = rng.multinomial(1, [0.5, 0.3, 0.2], size=counts.shape)  # [T, N, 3]
        y = (k * counts[..., None]).astype(np.float32)
        y[0, :, 1:] = 0  # one category only
        return {"counts": y}
    raise AssertionError(family)


def _write_modality(root: zarr.Group, family: str, arrays: dict, present: np.ndarray) -> None:
    """`inputs/<family>/` as the ingest step lays it out; absent cells are NaN columns."""
    group = fresh_group(root, inputs_key(family), "bayesdream-modality", distribution=family)
    for name, values in arrays.items():
        values = values.copy()
        values[:, ~present] = np.nan
        chunks = STORE_CHUNKS + values.shape[2:]
        array = group.create_array(
            name, shape=values.shape, chunks=chunks, dtype="float32", fill_value=np.nan
        )
        array[...] = values
    write_array(group, "present", present, dims=("cell",))
    n_features = next(iter(arrays.values())).shape[0]
    write_strings(group, "feature_names", [f"f{t}" for t in range(n_features)], dims=("feature",))
    group.attrs[COMPLETE] = True


@pytest.fixture(scope="module")
def screen_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, GroupAssignment]:
    """One store with a modality of each family, named after it, and the demo's groups."""
    folder = tmp_path_factory.mktemp("screen")
    counts, cells = _demo_screen(folder)
    groups = assign_groups(
        cells[["cell_line"]], (cells["target"] == "ntc").to_numpy(), use_all_cells=False
    )
    rng = np.random.default_rng(7)
    present = np.ones(N_CELLS, dtype=bool)
    present[rng.choice(np.flatnonzero(groups.fit), size=3, replace=False)] = False
    root = open_root(folder / "screen.zarr", create=True)
    sum_factor = cells["sum_factor"].to_numpy()
    write_array(root.require_group(CELLS), "sum_factor", sum_factor, dims=("cell",))
    for family in FAMILIES:
        _write_modality(root, family, _family_data(family, counts, groups.code, rng), present)
    return str(folder / "screen.zarr"), groups


FAMILIES = ("negbinom", "binomial", "normal", "multinomial")


def _assert_same(actual: FilterFlags, expected: FilterFlags) -> None:
    for name, values in expected.as_dict().items():
        np.testing.assert_array_equal(actual.as_dict()[name], values, err_msg=name)
        assert actual.as_dict()[name].dtype == np.bool_


def test_feature_blocks_never_leave_one_feature_alone() -> None:
    assert _feature_blocks(10, 5) == (5, 5)
    assert _feature_blocks(11, 5) == (5, 6)
    assert _feature_blocks(12, 5) == (5, 5, 2)
    assert _feature_blocks(1, 5) == (1,)
    assert _feature_blocks(3, 512) == (3,)


@pytest.mark.parametrize("family", FAMILIES)
def test_dask_flags_equal_the_numpy_flags(
    cluster: LocalCluster, screen_store: tuple[str, GroupAssignment], family: str
) -> None:
    path, groups = screen_store
    root = open_root(path)
    expected = get_family(family).flags(read_fit_arrays(root, family, groups))
    assert expected.ntc_excluded_from_fit.any() and not expected.ntc_excluded_from_fit.all()
    with Client(cluster.scheduler_address) as client:
        for block_features in (None, 2, 3, 5):  # 5: the 11th feature joins the last block
            _assert_same(
                dask_flags(path, family, groups, family, block_features=block_features), expected
            )
        _assert_same(filter_features(root, family, groups, use_dask=True), expected)
        assert "bayesdream-flags" in _task_prefixes(client)
    _assert_same(read_flags(root, family), expected)
    _assert_same(filter_features(root, family, groups, use_dask=False), expected)


def test_dask_flags_without_a_client_use_local_threads(
    screen_store: tuple[str, GroupAssignment],
) -> None:
    path, groups = screen_store
    expected = get_family("binomial").flags(read_fit_arrays(open_root(path), "binomial", groups))
    _assert_same(dask_flags(path, "binomial", groups, "binomial", block_features=4), expected)


# -- (b) the whole flow on the cluster -----------------------------------------------------
def _two_modality_config(folder: Path) -> Path:
    """The demo (gene: negbinom with the cis feature) plus `expr`: log1p counts, normal."""
    config = write_demo_inputs(folder, n_cells=60, n_features=8, niters=100, nsamples=10)
    counts = pd.read_csv(config.parent / "gene_counts.csv", index_col=0)
    np.log1p(counts).to_csv(config.parent / "expr.csv")
    data = yaml.safe_load(config.read_text())
    data["modalities"]["expr"] = {"distribution": "normal", "counts": "expr.csv"}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def test_flow_runs_both_chains_on_the_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    config = _two_modality_config(tmp_path / "demo")
    with Client(cluster.scheduler_address) as client, get_task_stream(client) as stream:
        store = with_dask(cluster.scheduler_address)(str(config))
        prefixes = _task_prefixes(client)
    root = zarr.open_group(store, mode="r")
    assert root.attrs[COMPLETE] is True
    for name in ("gene", "expr"):
        group = root[results_key(name)]
        assert group.attrs[COMPLETE] is True
        assert group["alpha_y"].shape[0] == 10
        expected = get_family(group.attrs["distribution"]).flags(
            read_fit_arrays(root, name, read_groups(root))
        )
        _assert_same(read_flags(root, name), expected)
    assert root["technical/cis"].attrs[COMPLETE] is True
    # the filters ran as Dask blocks; the two fits ran at once, one on each worker
    assert {"bayesdream-flags", "fit", "sample"} <= prefixes
    fits = [t for t in stream.data if str(t["key"]).startswith("fit-")]
    assert len(fits) == 2, [t["key"] for t in stream.data]
    assert len({t["worker"] for t in fits}) == 2
    (start_a, stop_a), (start_b, stop_b) = (_compute_span(t) for t in fits)
    assert start_a < stop_b and start_b < stop_a


def _compute_span(task: dict) -> tuple[float, float]:
    (span,) = [s for s in task["startstops"] if s["action"] == "compute"]
    return span["start"], span["stop"]


# -- the CLI and the PREFECT_API_URL warning (no cluster needed) ----------------------------
def test_cli_refuses_threads_and_a_cluster_together(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_demo_inputs(tmp_path / "demo", n_cells=60, n_features=8)
    with caplog.at_level(logging.ERROR, logger="bayesdream"):
        status = main(["run", str(config), "--dask", "tcp://127.0.0.1:8786", "--workers", "2"])
    assert status == 2
    assert any(
        "--workers 2 (threads) and --dask tcp://127.0.0.1:8786" in r.getMessage()
        for r in caplog.records
    )


def test_remote_cluster_without_an_api_url_warns(caplog: pytest.LogCaptureFixture) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}), caplog.at_level(logging.WARNING):
        flow = with_dask("tcp://192.0.2.1:8786")  # nothing is contacted before the flow runs
    assert flow.task_runner.address == "tcp://192.0.2.1:8786"
    assert any("PREFECT_API_URL is not set" in r.getMessage() for r in caplog.records)
