"""Negbinom feature filters on planted features (docs/model.md "Feature filters")."""

from __future__ import annotations

import numpy as np
import pytest
from factories import counts_matrix

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family

FLAG_NAMES = {
    "ntc_zero_count",
    "ntc_zero_std",
    "ntc_single_category",
    "ntc_excluded_from_fit",
    "technical_correction_applied",
}


def planted(n_groups: int = 3) -> FitArrays:
    """Columns: 0-3 ordinary counts, 4 all zero, 5 constant 3, 6 one non-zero cell, 7 constant 1."""
    y, groups, sum_factor = counts_matrix(n_cells=60, n_features=4, n_groups=n_groups, seed=3)
    n = y.shape[0]
    single = np.zeros(n)
    single[17] = 2.0
    extra = np.column_stack([np.zeros(n), np.full(n, 3.0), single, np.ones(n)])
    return FitArrays(
        y=np.hstack([y, extra]), groups=groups, n_groups=n_groups, sum_factor=sum_factor
    )


@pytest.mark.parametrize("n_groups", [1, 3])
def test_planted_features_are_flagged(n_groups: int) -> None:
    flags = get_family("negbinom").flags(planted(n_groups))
    # the all-zero feature: zero count, excluded
    assert flags.ntc_zero_count.tolist() == [False] * 4 + [True, False, False, False]
    assert flags.ntc_excluded_from_fit[4]
    # constant non-zero features: zero std only
    for t in (5, 7):
        assert flags.ntc_zero_std[t] and not flags.ntc_zero_count[t]
    # ordinary features and a feature with a single non-zero cell: not flagged
    for t in (0, 1, 2, 3, 6):
        assert not flags.ntc_zero_count[t] and not flags.ntc_zero_std[t]
    assert flags.ntc_excluded_from_fit.tolist() == [False] * 4 + [True, True, False, True]


def test_derived_flags_and_single_category() -> None:
    flags = get_family("negbinom").flags(planted())
    any_reason = flags.ntc_zero_count | flags.ntc_zero_std | flags.ntc_single_category
    np.testing.assert_array_equal(flags.ntc_excluded_from_fit, any_reason)
    np.testing.assert_array_equal(flags.technical_correction_applied, ~any_reason)
    assert flags.ntc_single_category.dtype == bool and not flags.ntc_single_category.any()
    flag_dict = flags.as_dict()
    assert set(flag_dict) == FLAG_NAMES
    for values in flag_dict.values():
        assert values.shape == (8,) and values.dtype == bool


def test_flags_use_the_cells_given() -> None:
    """A feature that is non-zero only in cells left out of the fit is flagged."""
    data = planted()
    y = data.y.copy()
    y[:, 0] = 0.0
    y[-5:, 0] = 4.0  # counts only in the last five cells
    fit_cells = FitArrays(
        y=y[:-5], groups=data.groups[:-5], n_groups=3, sum_factor=data.sum_factor[:-5]
    )
    assert get_family("negbinom").flags(fit_cells).ntc_zero_count[0]
    all_cells = FitArrays(y=y, groups=data.groups, n_groups=3, sum_factor=data.sum_factor)
    assert not get_family("negbinom").flags(all_cells).ntc_excluded_from_fit[0]
