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
    sums = np.zeros((n_groups,) + y.shape[1:], dtype=np.float64)
    np.add.at(sums, groups, y)
    counts = np.bincount(groups, minlength=n_groups).astype(np.float64)
    return sums / np.maximum(counts, 1.0).reshape((-1,) + (1,) * (y.ndim - 1))
