"""Per feature and group summaries of the posterior effects, on their natural scale.

The scale is the effect's own: log2 for multiplicative (negbinom) effects, logit for
binomial and multinomial, data units for normal / studentt; that is `alpha_y_add` in the
results. `effect_summary` computes mean, sd and quantiles as [C, T(, K)] arrays, one block
of features at a time; `summarize` lays them out as a long table (the `summary` command),
`tasks.results.export` as an AnnData or a table file. Every group's effect is relative to the
baseline group (code 0, the first label; `baseline_group:` in the config), whose rows
the long table marks in its `baseline` column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import zarr

from tasks.errors import StoreError
from tasks.groups import FIRST_SORTED
from tasks.store import (
    CIS_KEY,
    FIT_FLAGS,
    is_complete,
    open_root,
    read_strings,
    require_complete,
    results_key,
)

QUANTILES = (0.05, 0.5, 0.95)
STATS = ("mean", "sd", "q05", "q50", "q95")
BLOCK = 1024
FLAGS = (
    "ntc_zero_count",
    "ntc_zero_std",
    "ntc_single_category",
    "ntc_excluded_from_fit",
    "technical_correction_applied",
)
SCALES = {"multiplicative": "log2", "logit": "logit"}
ADDITIVE_SCALE = "additive (data units)"
ATTRS = (
    "distribution",
    "effect_type",
    "guide",
    "nsamples",
    "niters_run",
    "stop_reason",
    "baseline_rule",
)
BASELINE = "baseline"  # the long table's column: True on the baseline group's rows


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class EffectSummary:
    """One modality's effect summaries: `stats[name]` [C, T(, K)] for each of STATS."""

    modality: str
    features: np.ndarray  # [T] (the cis feature is not among them)
    groups: np.ndarray  # [C] labels, code order (group 0 = baseline)
    stats: dict[str, np.ndarray]
    flags: dict[str, np.ndarray]  # [T] bool each
    scale: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        """The baseline group's label: code 0, the first in `groups`."""
        return str(self.groups[0])

    @property
    def baseline_rule(self) -> str:
        """How the baseline was chosen (stores from before `baseline_group:` sorted)."""
        return str(self.attrs.get("baseline_rule", FIRST_SORTED))

    @property
    def n_categories(self) -> int | None:
        """K for multinomial effects, else None."""
        mean = self.stats["mean"]
        return int(mean.shape[2]) if mean.ndim == 3 else None


def results_group(store: str, modality: str) -> zarr.Group:
    """`technical/<modality>` of a finished run, or an error naming what is there."""
    root = open_root(store)
    if results_key(modality) == CIS_KEY:
        raise StoreError(
            f"'{CIS_KEY}' holds the cis feature's draws (alpha_x …), not a modality's; "
            "give the modality's name to --modality."
        )
    try:
        return require_complete(root, results_key(modality), "sample")
    except StoreError as err:
        raise StoreError(f"{err} Modalities with results: {finished_modalities(root)}.") from None


def finished_modalities(root: zarr.Group) -> list[str]:
    """The modalities whose results are complete, sorted (the cis group is not one)."""
    return sorted(
        key
        for key in (root["technical"].group_keys() if "technical" in root else [])
        if results_key(key) != CIS_KEY and is_complete(root, results_key(key))
    )


def effect_summary(store: str, modality: str) -> EffectSummary:
    """mean, sd, q05, q50, q95 over draws of `alpha_y_add`, block by block over features."""
    group = results_group(store, modality)
    effects = group["alpha_y_add"]  # [S, C, T(, K)]
    blocks = [
        _stats(effects[:, :, start : start + BLOCK]) for start in range(0, effects.shape[2], BLOCK)
    ]
    stats = {name: np.concatenate([b[name] for b in blocks], axis=1) for name in STATS}
    effect_type = group.attrs.get("effect_type")
    return EffectSummary(
        modality=modality,
        features=read_strings(group, "feature_names"),
        groups=read_strings(group, "group_labels"),
        stats=stats,
        flags={flag: group[flag][...] for flag in (*FLAGS, *FIT_FLAGS) if flag in group},
        scale=SCALES.get(effect_type, ADDITIVE_SCALE),
        attrs={key: group.attrs[key] for key in ATTRS if key in group.attrs},
    )


def _stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Summaries over the draws (axis 0) of effects [S, C, t(, K)] -> [C, t(, K)] each."""
    values = values.astype(np.float64)
    q = np.quantile(values, QUANTILES, axis=0)
    sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1:], np.nan)
    return {"mean": values.mean(axis=0), "sd": sd, "q05": q[0], "q50": q[1], "q95": q[2]}


def summarize(store: str, modality: str) -> pd.DataFrame:
    """mean, sd, q05, q50, q95 of `alpha_y_add` (log2 / logit / data units), `excluded`
    and `baseline` (True on the rows of the baseline group, whose effect is fixed at 0).

    One row per (feature, group), by group then feature within each block of features; 3-D
    (multinomial) effects [S, C, T, K] get one row per (feature, group, category).
    """
    summary = effect_summary(store, modality)
    n_features = len(summary.features)
    frames = [
        _rows(summary, start, min(start + BLOCK, n_features))
        for start in range(0, n_features, BLOCK)
    ]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out.attrs["scale"] = summary.scale
    out.attrs["baseline_group"] = summary.baseline
    return out


def _rows(summary: EffectSummary, start: int, stop: int) -> pd.DataFrame:
    """The long-table rows of features start..stop: (c, t(, k)) in C order."""
    block = {name: values[:, start:stop] for name, values in summary.stats.items()}
    shape = block["mean"].shape
    index = np.indices(shape).reshape(len(shape), -1)  # (c, t(, k)) per row
    feature = start + index[1]
    frame: dict[str, Any] = {
        "feature": summary.features[feature],
        "group": summary.groups[index[0]],
    }
    if len(shape) == 3:
        frame["category"] = index[2]
    frame |= {name: block[name].ravel() for name in STATS}
    frame["excluded"] = summary.flags["ntc_excluded_from_fit"][feature]
    frame[BASELINE] = index[0] == 0  # code 0 is the baseline group
    for flag in FIT_FLAGS:  # stores from before they existed lack them
        if flag in summary.flags:
            frame[flag] = summary.flags[flag][feature]
    return pd.DataFrame(frame)
