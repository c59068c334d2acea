"""Small numpy statistics shared by the families' empirical priors."""

from __future__ import annotations

import numpy as np

MAD_TO_SD = 1.4826


def robust_sd(y: np.ndarray, *, epsilon: float, nan_aware: bool = False) -> np.ndarray:
    """1.4826 * MAD per column, falling back to the plain sd where that is <= epsilon."""
    median = np.nanmedian if nan_aware else np.median
    std = np.nanstd if nan_aware else np.std
    centre = median(y, axis=0)
    mad = median(np.abs(y - centre), axis=0)
    rsd = MAD_TO_SD * mad
    return np.where(rsd > epsilon, rsd, std(y, axis=0))


def group_means(y: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean over the cells of each group: [C, T] from [N, T]."""
    counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    sums = group_sums(y, groups, n_groups)
    return sums / np.maximum(counts, 1.0).reshape((-1,) + (1,) * (y.ndim - 1))


def group_sums(y: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum over the cells of each group: [C, ...] from [N, ...] (float64)."""
    sums = np.zeros((n_groups,) + y.shape[1:], dtype=np.float64)
    for g in range(n_groups):  # C is small; one vectorised sum per group
        sums[g] = y[groups == g].sum(axis=0, dtype=np.float64)
    return sums


def any_group_all(condition: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Per feature: does some group have `condition` true in ALL of its cells? [T] from [N, T]."""
    hits = group_sums(condition.astype(np.float64), groups, n_groups)
    sizes = np.bincount(groups, minlength=n_groups).reshape((-1,) + (1,) * (condition.ndim - 1))
    return ((hits == sizes) & (sizes > 0)).any(axis=0)


def constant(values: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """Standard deviation 0, tested as max == min over the non-NaN values (all-NaN: True).

    The same as `std == 0` in exact arithmetic, but immune to rounding: numpy's std of a
    constant 0.1 column is ~1e-8 or ~1e-6 depending on the array's layout.
    """
    with np.errstate(invalid="ignore"):
        finite = ~np.isnan(values)
        top = np.where(finite, values, -np.inf).max(axis=axis)
        bottom = np.where(finite, values, np.inf).min(axis=axis)
    return ~(top > bottom)
