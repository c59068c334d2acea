"""The negbinom counts' (feature, value) histogram: the lgamma terms of the likelihood.

Σ_n [lgamma(φ_t + y) - lgamma(φ_t) - lgamma(y + 1)] over a feature's cells depends on its
counts only through how many cells have each value: integer values 1..SMALL_VALUES go to a
per-feature table (`small_count`), the rest are (feature, value, count) pairs, and the
-lgamma(y + 1) part is a constant. Built once from the non-zeros, joined when statistics
of cell batches merge.
"""

from __future__ import annotations

import numpy as np
import torch

from bayesdream_model.sparse import SparseCounts, column_runs

SMALL_VALUES = 16
ENTRY_CHUNK = 1 << 22  # entries per column run while building the statistics


def value_histograms(y: SparseCounts) -> dict[str, np.ndarray]:
    """The (feature, value) histogram and -Σ lgamma(y + 1), one run of columns at a time
    (the temporaries stay small next to the entries themselves)."""
    n_features = y.shape[1]
    pairs, counts = [], []
    for lo, hi in column_runs(y.indptr, ENTRY_CHUNK):
        span = slice(y.indptr[lo], y.indptr[hi])
        local = np.repeat(np.arange(hi - lo), np.diff(y.indptr[lo : hi + 1]))
        run_pairs, run_counts = _value_histogram(local, y.values[span], hi - lo)
        run_pairs[0] += lo
        pairs.append(run_pairs)
        counts.append(run_counts)
    out = {}
    out["pair_feature"], out["pair_value"] = np.concatenate([np.zeros((2, 0)), *pairs], axis=1)
    out["pair_count"] = np.concatenate([np.zeros(0), *counts])
    lgamma_y1 = torch.lgamma(torch.as_tensor(out["pair_value"]) + 1).numpy()
    out["constant"] = np.float64(-(out["pair_count"] @ lgamma_y1))
    out |= _small_pairs(
        out.pop("pair_feature"), out.pop("pair_value"), out.pop("pair_count"), n_features
    )
    return out


def _small_pairs(feature: np.ndarray, value: np.ndarray, count: np.ndarray, n_features: int):
    """The histogram split: integer values 1..SMALL_VALUES, whose lgamma(φ + v) - lgamma(φ)
    = Σ_{i<v} log(φ + i) is read off one cumulative sum of logs per feature (`small_count`
    [T, SMALL_VALUES]: how many cells of feature t have the count v + 1), and the rest
    (`pair_feature`, `pair_value`, `pair_count`), through `shifted_lgamma`."""
    small = (value == np.round(value)) & (value >= 1) & (value <= SMALL_VALUES)
    index = (feature[small] * SMALL_VALUES + value[small] - 1).astype(np.int64)
    table = np.bincount(index, count[small], minlength=n_features * SMALL_VALUES)
    return {
        "small_count": table.reshape(n_features, SMALL_VALUES),
        "pair_feature": feature[~small],
        "pair_value": value[~small],
        "pair_count": count[~small],
    }


def joined_pairs(feature: torch.Tensor, value: torch.Tensor, count: torch.Tensor) -> dict:
    """(feature, value) pairs with their counts, duplicates summed."""
    keys, inverse = torch.unique(torch.stack([feature.double(), value]), dim=1, return_inverse=True)
    total = torch.zeros(keys.shape[1], dtype=count.dtype).index_add_(0, inverse, count)
    return {"pair_feature": keys[0].long(), "pair_value": keys[1], "pair_count": total}


def _value_histogram(
    cols: np.ndarray, values: np.ndarray, n_features: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (feature, value) pairs [2, P], by feature then value, and their counts.

    Integer counts below a cap that keeps the table small (at most HISTOGRAM_BINS keys:
    feature x value) are counted by `bincount` (one pass, no sort), larger ones (deep
    features' tails: few) land in an overflow bin and are counted by one 1-D sort of
    integer keys, as are non-integer values. numpy's unique over the columns of a 2-D
    array sorts structured records and was 20x slower.
    """
    top = float(values.max(initial=0.0))
    cap = int(min(top, HISTOGRAM_BINS // max(n_features, 1) - 2))  # counted <= cap
    if not values.size or cap < 0 or not (values == np.round(values)).all():
        return _sorted_histogram(cols, values)
    width = cap + 2  # the last column: every count above the cap
    # integers (checked): the cap applied to the int64 counts, not to floats (4x faster)
    keys = cols.astype(np.int64) * width + np.minimum(values.astype(np.int64), cap + 1)
    table = np.bincount(keys, minlength=n_features * width).reshape(n_features, width)
    table[:, cap + 1] = 0
    feature, value = np.nonzero(table)
    pairs = np.stack([feature.astype(np.float64), value.astype(np.float64)])
    counts = table[feature, value]
    above = np.flatnonzero(values > cap)
    if above.size:  # join them, then by feature and value again (few pairs)
        more, more_counts = _sorted_histogram(cols[above], values[above])
        pairs, counts = np.concatenate([pairs, more], axis=1), np.concatenate([counts, more_counts])
        order = np.lexsort((pairs[1], pairs[0]))
        pairs, counts = pairs[:, order], counts[order]
    return pairs, counts


def _sorted_histogram(cols: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_value_histogram` by one sort of (feature, distinct value) integer keys."""
    distinct, code = np.unique(values, return_inverse=True)
    keys, counts = np.unique(cols.astype(np.int64) * len(distinct) + code, return_counts=True)
    feature, which = np.divmod(keys, len(distinct))
    return np.stack([feature.astype(np.float64), distinct.astype(np.float64)[which]]), counts


HISTOGRAM_BINS = 1 << 23  # 64 MB of int64 counts at most
