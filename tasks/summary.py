"""Per feature and group summaries of the posterior effects, on their natural scale."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.errors import StoreError
from tasks.store import open_root, read_strings, require_complete, results_key

QUANTILES = (0.05, 0.5, 0.95)
BLOCK = 1024


def summarize(store: str, modality: str) -> pd.DataFrame:
    """mean, sd, q05, q50, q95 of `alpha_y_add` (log2 / logit / data units) and `excluded`."""
    root = open_root(store)
    try:
        group = require_complete(root, results_key(modality), "sample")
    except StoreError as err:
        have = sorted(root["technical"].group_keys()) if "technical" in root else []
        raise StoreError(f"{err} Modalities with results: {have}.") from None
    effects = group["alpha_y_add"]  # [S, C, T]
    names = read_strings(group, "feature_names")
    labels = read_strings(group, "group_labels")
    excluded = group["ntc_excluded_from_fit"][...]
    frames = []
    for start in range(0, effects.shape[-1], BLOCK):
        values = effects[..., start : start + BLOCK].astype(np.float64)  # [S, C, t]
        q = np.quantile(values, QUANTILES, axis=0)  # [3, C, t]
        n_groups, width = values.shape[1:]
        frames.append(
            pd.DataFrame(
                {
                    "feature": np.tile(names[start : start + width], n_groups),
                    "group": np.repeat(labels, width),
                    "mean": values.mean(axis=0).ravel(),
                    "sd": values.std(axis=0, ddof=1).ravel() if len(values) > 1 else np.nan,
                    "q05": q[0].ravel(),
                    "q50": q[1].ravel(),
                    "q95": q[2].ravel(),
                    "excluded": np.tile(excluded[start : start + width], n_groups),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    out.attrs["scale"] = {"multiplicative": "log2", "logit": "logit"}.get(
        group.attrs.get("effect_type"), "additive (data units)"
    )
    return out
