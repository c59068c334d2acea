"""Per feature and group summaries of the posterior effects, on their natural scale."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.errors import StoreError
from tasks.store import (
    CIS_KEY,
    is_complete,
    open_root,
    read_strings,
    require_complete,
    results_key,
)

QUANTILES = (0.05, 0.5, 0.95)
BLOCK = 1024


def summarize(store: str, modality: str) -> pd.DataFrame:
    """mean, sd, q05, q50, q95 of `alpha_y_add` (log2 / logit / data units) and `excluded`.

    One row per (feature, group), by group then feature within each block of features; 3-D
    (multinomial) effects [S, C, T, K] get one row per (feature, group, category).
    """
    root = open_root(store)
    if results_key(modality) == CIS_KEY:
        raise StoreError(
            f"'{CIS_KEY}' holds the cis feature's draws (alpha_x …), not a modality's; "
            "give the modality's name to --modality."
        )
    try:
        group = require_complete(root, results_key(modality), "sample")
    except StoreError as err:
        have = sorted(
            key
            for key in (root["technical"].group_keys() if "technical" in root else [])
            if results_key(key) != CIS_KEY and is_complete(root, results_key(key))
        )
        raise StoreError(f"{err} Modalities with results: {have}.") from None
    effects = group["alpha_y_add"]  # [S, C, T(, K)]
    names = read_strings(group, "feature_names")
    labels = read_strings(group, "group_labels")
    excluded = group["ntc_excluded_from_fit"][...]
    frames = [
        _block(effects[:, :, start : start + BLOCK], names, labels, excluded, start)
        for start in range(0, effects.shape[2], BLOCK)
    ]
    out = pd.concat(frames, ignore_index=True)
    out.attrs["scale"] = {"multiplicative": "log2", "logit": "logit"}.get(
        group.attrs.get("effect_type"), "additive (data units)"
    )
    return out


def _block(
    values: np.ndarray, names: np.ndarray, labels: np.ndarray, excluded: np.ndarray, start: int
) -> pd.DataFrame:
    """Summaries of effects [S, C, t(, K)] for features start..start+t."""
    values = values.astype(np.float64)
    index = np.indices(values.shape[1:]).reshape(values.ndim - 1, -1)  # (c, t(, k)) per row
    feature = start + index[1]
    frame = {"feature": names[feature], "group": labels[index[0]]}
    if values.ndim == 4:
        frame["category"] = index[2]
    q = np.quantile(values, QUANTILES, axis=0)  # [3, C, t(, K)]
    sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1:], np.nan)
    frame |= {
        "mean": values.mean(axis=0).ravel(),
        "sd": sd.ravel(),
        "q05": q[0].ravel(),
        "q50": q[1].ravel(),
        "q95": q[2].ravel(),
        "excluded": excluded[feature],
    }
    return pd.DataFrame(frame)
