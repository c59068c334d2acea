"""A modality's effects out of the store: an AnnData (`.h5ad`) or a table (parquet, CSV).

The AnnData has one `var` row per feature of the results (the cis feature is in
`technical/cis`, not here), the five filter flags as `var` columns, and in `varm` the
effect summaries `alpha_mean`, `alpha_sd`, `alpha_q05`, `alpha_q95` as [features x groups]
DataFrames whose columns are the group labels (multinomial: `<group>:<category>`), on
the summary's scale (`tasks.results.summary`). It has no cells (`n_obs = 0`): its `var_names`
are the screen's, so the matrices can be copied into the screen's own AnnData. `uns
["bayesdream"]` says the modality, the scale, the baseline group (`baseline_group`, and
`baseline_rule`: named by `baseline_group:` or the first in sorted order) and how the
posterior was drawn. The tables are the `summary` command's long table, whose
`baseline` column is True on the baseline group's rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import PipelineError
from tasks.results.summary import EffectSummary, effect_summary, summarize

logger = logging.getLogger(__name__)

FORMATS = {".h5ad": "h5ad", ".parquet": "parquet", ".csv": "csv"}
VARM = {"alpha_mean": "mean", "alpha_sd": "sd", "alpha_q05": "q05", "alpha_q95": "q95"}
UNS_KEY = "bayesdream"


def export_format(out: Path, fmt: str | None) -> str:
    """`fmt`, or the one `out`'s suffix names; an error when neither says."""
    if fmt is not None:
        if fmt not in FORMATS.values():
            raise PipelineError(f"--format {fmt}: expected one of {sorted(FORMATS.values())}.")
        return fmt
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise PipelineError(
            f"Cannot tell the format of '{out}' from its suffix: name it .h5ad, .parquet or "
            ".csv, or give --format h5ad|parquet|csv."
        )
    return FORMATS[suffix]


def export_effects(store: str, modality: str, out: Path, fmt: str | None = None) -> dict:
    """Write the modality's effects to `out`; returns what was written."""
    fmt = export_format(out, fmt)
    out = Path(out)
    if fmt == "h5ad":
        summary = effect_summary(store, modality)
        adata = effects_anndata(summary, store=store)
        adata.write_h5ad(out)
        logger.info(
            "Wrote %d features x %d groups (%s scale) to %s",
            adata.n_vars,
            len(summary.groups),
            summary.scale,
            out,
        )
        return {"format": fmt, "features": adata.n_vars, "scale": summary.scale}
    table = summarize(store, modality)
    if fmt == "parquet":
        _write_parquet(table, out)
    else:
        table.to_csv(out, index=False)
    logger.info("Wrote %d rows (%s scale) to %s", len(table), table.attrs["scale"], out)
    return {"format": fmt, "rows": len(table), "scale": table.attrs["scale"]}


def effects_anndata(summary: EffectSummary, *, store: str | None = None) -> Any:
    """The AnnData: var = features (flags as columns), varm = effect summaries."""
    import anndata as ad

    features = pd.Index(summary.features, name="feature")
    var = pd.DataFrame({flag: values for flag, values in summary.flags.items()}, index=features)
    columns = _columns(summary)
    varm = {
        key: pd.DataFrame(_features_first(summary.stats[stat]), index=features, columns=columns)
        for key, stat in VARM.items()
    }
    uns = {
        UNS_KEY: {
            "modality": summary.modality,
            "scale": summary.scale,
            "group_labels": list(map(str, summary.groups)),
            "store": "" if store is None else str(store),
            **{k: _plain(v) for k, v in summary.attrs.items()},
            "baseline_group": summary.baseline,  # code 0, whatever the rule
            "baseline_rule": summary.baseline_rule,
        }
    }
    obs = pd.DataFrame(index=pd.Index([], dtype=str, name="cell"))
    return ad.AnnData(obs=obs, var=var, varm=varm, uns=uns)


def _columns(summary: EffectSummary) -> list[str]:
    """Group labels; with K categories, `<group>:<k>` group by group."""
    labels = [str(g) for g in summary.groups]
    if summary.n_categories is None:
        return labels
    return [f"{g}:{k}" for g in labels for k in range(summary.n_categories)]


def _features_first(values: np.ndarray) -> np.ndarray:
    """[C, T(, K)] -> [T, C(*K)], columns ordered as `_columns`."""
    moved = np.moveaxis(values, 1, 0)  # [T, C(, K)]
    return moved.reshape(moved.shape[0], -1)


def _plain(value: Any) -> Any:
    """Attribute values as h5ad can store them (None becomes "")."""
    return "" if value is None else value


def _write_parquet(table: pd.DataFrame, out: Path) -> None:
    """pandas' parquet writer needs pyarrow: say how to get it."""
    try:
        table.to_parquet(out, index=False)
    except ImportError as err:
        raise PipelineError(
            f"Writing '{out}' as parquet needs pyarrow ({err}); install it with "
            "`pip install pyarrow` (or the package's `analysis` extra), or use --format csv."
        ) from None
