"""Technical groups: sorted covariate combinations, the named baseline, groups without NTC
cells, fit cells."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.errors import InputDataError
from tasks.groups import (
    FIRST_SORTED,
    NAMED,
    NOT_FIT,
    assign_groups,
    assign_groups_in_store,
    read_groups,
)
from tasks.ingest import write_cells
from tasks.store import COMPLETE, GROUPS, open_root


def _covariates(seed: int = 0, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "cell_line": rng.choice(["TF1", "K562", "HEL"], size=n),
            "lane": rng.choice(["L2", "L1"], size=n),
        }
    )


def test_codes_match_pandas_ngroup_and_labels_follow_code_order() -> None:
    cov = _covariates()
    is_ntc = np.ones(len(cov), bool)
    result = assign_groups(cov, is_ntc, use_all_cells=False)
    expected = cov.groupby(["cell_line", "lane"], sort=True).ngroup().to_numpy()
    np.testing.assert_array_equal(result.code, expected)
    assert result.labels == sorted(result.labels)  # sorted order of the combinations
    assert result.labels[0] == "HEL|L1" and len(result.labels) == 6
    for code, label in enumerate(result.labels):
        rows = cov[result.code == code]
        assert set(rows["cell_line"] + "|" + rows["lane"]) == {label}
    assert result.dropped == {}
    assert result.fit.all()


def test_numeric_covariates_sort_numerically() -> None:
    cov = pd.DataFrame({"batch": [10, 2, 10, 2, 1]})
    result = assign_groups(cov, np.ones(5, bool), use_all_cells=False)
    np.testing.assert_array_equal(result.code, [2, 1, 2, 1, 0])
    assert result.labels == ["1", "2", "10"]


def test_no_covariates_is_one_group() -> None:
    cov = pd.DataFrame(index=range(7))
    is_ntc = np.array([True, False, True, True, False, True, False])
    result = assign_groups(cov, is_ntc, use_all_cells=False)
    np.testing.assert_array_equal(result.code, np.zeros(7, np.int64))
    assert len(result.labels) == 1
    np.testing.assert_array_equal(result.fit, is_ntc)


def test_group_without_ntc_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cov = pd.DataFrame({"cell_line": ["A", "A", "B", "B", "B", "C", "C"]})
    is_ntc = np.array([True, False, False, False, False, True, False])
    with caplog.at_level(logging.WARNING, logger="tasks.groups"):
        result = assign_groups(cov, is_ntc, use_all_cells=False)
    assert result.labels == ["A", "C"]
    assert result.dropped == {"B": 3}
    np.testing.assert_array_equal(result.code, [0, 0, NOT_FIT, NOT_FIT, NOT_FIT, 1, 1])
    np.testing.assert_array_equal(result.fit, [True, False, False, False, False, True, False])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "B (3 cells)" in warnings[0] and "without NTC" in warnings[0]


def test_dropping_the_baseline_group_keeps_codes_contiguous() -> None:
    cov = pd.DataFrame({"cell_line": ["A", "A", "B", "C", "C", "D"], "lane": ["1"] * 6})
    is_ntc = np.array([False, False, True, False, False, True])
    result = assign_groups(cov, is_ntc, use_all_cells=True)
    assert result.labels == ["B|1", "D|1"]
    assert result.dropped == {"A|1": 2, "C|1": 2}
    np.testing.assert_array_equal(result.code, [NOT_FIT, NOT_FIT, 0, NOT_FIT, NOT_FIT, 1])
    assert sorted(set(result.code[result.code != NOT_FIT])) == [0, 1]


def test_policy_error_names_the_group() -> None:
    cov = pd.DataFrame({"cell_line": ["A", "B", "B"]})
    with pytest.raises(InputDataError, match=r"without NTC cells.*'B': 2"):
        assign_groups(cov, np.array([True, False, False]), use_all_cells=False, policy="error")


def test_use_all_cells_fits_every_cell_of_kept_groups() -> None:
    cov = pd.DataFrame({"cell_line": ["A", "A", "A", "B", "B", "C"]})
    is_ntc = np.array([True, False, False, False, False, True])
    result = assign_groups(cov, is_ntc, use_all_cells=True)
    np.testing.assert_array_equal(result.fit, [True, True, True, False, False, True])
    np.testing.assert_array_equal(result.code, [0, 0, 0, NOT_FIT, NOT_FIT, 1])


def test_missing_covariate_value_is_refused() -> None:
    cov = pd.DataFrame({"cell_line": ["A", None, "B", np.nan]})
    with pytest.raises(InputDataError, match=r"'cell_line'.*2 cell"):
        assign_groups(cov, np.ones(4, bool), use_all_cells=False)


def test_assignment_round_trips_through_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = pd.DataFrame(
        {
            "cell": [f"c{i}" for i in range(6)],
            "target": ["ntc", "MYB", "ntc", "MYB", "MYB", "ntc"],
            "cell_line": ["K562", "K562", "HEL", "TF1", "TF1", "HEL"],
            "sum_factor": np.ones(6),
        }
    )
    root = open_root(tmp_path / "run.zarr", create=True)
    write_cells(root, table, ["cell_line"], "sum_factor")
    with caplog.at_level(logging.WARNING, logger="tasks.groups"):
        result = assign_groups_in_store(root, use_all_cells=True, policy="drop")
    assert any("use_all_cells" in r.getMessage() for r in caplog.records)
    assert any("TF1 (2 cells)" in r.getMessage() for r in caplog.records)
    assert root[GROUPS].attrs[COMPLETE] is True
    stored = read_groups(root)
    assert stored.labels == result.labels == ["HEL", "K562"]
    np.testing.assert_array_equal(stored.code, [1, 1, 0, NOT_FIT, NOT_FIT, 0])
    np.testing.assert_array_equal(stored.fit, [True, True, True, False, False, True])
    assert stored.dropped == {"TF1": 2}


# -- baseline_group: the named group is code 0 ------------------------------------------
def test_named_baseline_is_code_0_and_the_others_keep_sorted_order() -> None:
    cov = pd.DataFrame({"cell_line": ["TF1", "K562", "HEL", "K562", "TF1", "HEL"]})
    result = assign_groups(cov, np.ones(6, bool), use_all_cells=False, baseline="K562")
    assert result.labels == ["K562", "HEL", "TF1"]
    assert result.baseline == "K562" and result.baseline_rule == NAMED
    np.testing.assert_array_equal(result.code, [2, 0, 1, 0, 2, 1])
    last = assign_groups(cov, np.ones(6, bool), use_all_cells=False, baseline="TF1")
    assert last.labels == ["TF1", "HEL", "K562"]
    np.testing.assert_array_equal(last.code, [0, 2, 1, 2, 0, 1])


def test_named_baseline_with_two_covariates_is_the_combined_label() -> None:
    cov = _covariates()
    default = assign_groups(cov, np.ones(len(cov), bool), use_all_cells=False)
    result = assign_groups(cov, np.ones(len(cov), bool), use_all_cells=False, baseline="K562|L2")
    assert result.labels == ["K562|L2", *(g for g in default.labels if g != "K562|L2")]
    for code, label in enumerate(result.labels):  # every cell keeps its combination
        rows = cov[result.code == code]
        assert set(rows["cell_line"] + "|" + rows["lane"]) == {label}


def test_default_baseline_is_the_first_in_sorted_order() -> None:
    cov = _covariates(seed=1)
    default = assign_groups(cov, np.ones(len(cov), bool), use_all_cells=False)
    named_none = assign_groups(cov, np.ones(len(cov), bool), use_all_cells=False, baseline=None)
    assert default.labels == named_none.labels == sorted(default.labels)
    np.testing.assert_array_equal(default.code, named_none.code)
    assert default.baseline == "HEL|L1" and default.baseline_rule == FIRST_SORTED


def test_named_baseline_is_applied_after_groups_without_ntc_are_dropped() -> None:
    cov = pd.DataFrame({"cell_line": ["A", "A", "B", "B", "B", "C", "C"]})
    is_ntc = np.array([True, False, False, False, False, True, False])
    result = assign_groups(cov, is_ntc, use_all_cells=False, baseline="C", warn=False)
    assert result.labels == ["C", "A"] and result.dropped == {"B": 3}
    np.testing.assert_array_equal(result.code, [1, 1, NOT_FIT, NOT_FIT, NOT_FIT, 0, 0])


def test_unknown_baseline_names_the_value_and_the_groups() -> None:
    cov = pd.DataFrame({"cell_line": ["K562", "HEL", "TF1"], "lane": ["L1", "L1", "L2"]})
    with pytest.raises(InputDataError) as err:
        assign_groups(cov, np.ones(3, bool), use_all_cells=False, baseline="L1|K562")
    message = str(err.value)
    assert "baseline_group 'L1|K562' is not a technical group" in message
    assert "'HEL|L1', 'K562|L1', 'TF1|L2'" in message
    assert "['cell_line', 'lane']" in message and "Did you mean 'K562|L1'?" in message


def test_baseline_of_a_group_without_ntc_cells_is_refused() -> None:
    cov = pd.DataFrame({"cell_line": ["A", "A", "B", "B", "B", "C"]})
    is_ntc = np.array([True, False, False, False, False, True])
    with pytest.raises(InputDataError, match=r"baseline_group 'B' has no NTC cells: its 3 cell"):
        assign_groups(cov, is_ntc, use_all_cells=False, baseline="B", warn=False)


def test_without_covariates_only_all_is_a_baseline() -> None:
    cov = pd.DataFrame(index=range(4))
    result = assign_groups(cov, np.ones(4, bool), use_all_cells=False, baseline="all")
    assert result.labels == ["all"] and result.baseline_rule == NAMED
    np.testing.assert_array_equal(result.code, np.zeros(4, np.int64))
    with pytest.raises(InputDataError, match=r"baseline_group 'K562' is not a technical group"):
        assign_groups(cov, np.ones(4, bool), use_all_cells=False, baseline="K562")


def test_named_baseline_is_recorded_in_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = pd.DataFrame(
        {
            "cell": [f"c{i}" for i in range(4)],
            "target": "ntc",
            "cell_line": ["K562", "HEL", "TF1", "HEL"],
            "sum_factor": np.ones(4),
        }
    )
    root = open_root(tmp_path / "run.zarr", create=True)
    write_cells(root, table, ["cell_line"], "sum_factor")
    with caplog.at_level(logging.INFO, logger="tasks.groups"):
        assign_groups_in_store(root, use_all_cells=False, policy="drop", baseline="TF1")
    attrs = root[GROUPS].attrs
    assert attrs["baseline_group"] == "TF1" and attrs["baseline_rule"] == NAMED
    stored = read_groups(root)
    assert stored.labels == ["TF1", "HEL", "K562"] and stored.baseline_rule == NAMED
    np.testing.assert_array_equal(stored.code, [2, 1, 0, 1])
    assert "3 technical groups: TF1, HEL, K562; baseline: TF1 (named by baseline_group)" in [
        r.getMessage() for r in caplog.records
    ]
    assign_groups_in_store(root, use_all_cells=False, policy="drop")
    assert root[GROUPS].attrs["baseline_group"] == "HEL"
    assert root[GROUPS].attrs["baseline_rule"] == FIRST_SORTED == "first in sorted order"
