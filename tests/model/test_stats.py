"""Small statistics shared by the families."""

from __future__ import annotations

import numpy as np

from bayesdream_model.data import FitArrays
from bayesdream_model.distributions import get_family
from bayesdream_model.stats import constant


def test_constant_is_immune_to_rounding() -> None:
    column = np.full((1000, 1), 0.1, dtype=np.float32)
    assert constant(column).tolist() == [True]
    assert constant(np.array([[1.0], [1.0 + 1e-6]])).tolist() == [False]


def test_constant_ignores_nan_and_all_nan_is_constant() -> None:
    values = np.array([[2.0, np.nan], [np.nan, np.nan], [2.0, np.nan]])
    assert constant(values).tolist() == [True, True]


def test_normal_flags_a_constant_decimal_score() -> None:
    """A feature at 0.1 in every cell is constant (std 0), whatever numpy's rounding says."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(300, 3)).astype(np.float32)
    y[:, 1] = 0.1
    data = FitArrays(y=y, groups=np.arange(300) % 3, n_groups=3)
    flags = get_family("normal").flags(data)
    assert flags.ntc_zero_std.tolist() == [False, True, False]
