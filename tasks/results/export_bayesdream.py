"""Hand-off to the reference bayesDREAM: the files its `load_technical_fit(input_dir=DIR)`
reads, holding this run's posterior draws, so that its next stages (`fit_cis`,
`fit_trans`) run on our technical fit. Written into DIR:

- `alpha_y_prefit_<modality>.pt` per modality: a CPU float32 tensor [S, C, T] ([S, C, T, K]
  for multinomial), which the loader sets as that modality's `alpha_y_prefit`. negbinom
  multiplicative (2 ** the log2 effect, baseline row 1.0); the others additive (binomial and
  multinomial natural-log logits, normal / studentt data units; baseline row 0.0).
  Features our filters excluded keep their place at the baseline value (1.0 / 0.0), where
  the reference leaves its own excluded features.
- `alpha_x_prefit.pt` when the run has a cis feature: [S, C], multiplicative.
- `features_<modality>.txt`, one name a line: not read by the loader, which checks no
  shapes; compare it with `model.modalities[m].feature_names`.

Features: the store's, in its order, without the cis feature and without those constant
over every cell of the store (missing values skipped), which bayesDREAM drops when it
builds a modality (zero sd; binomial: of the ratio where the denominator is > 0;
multinomial: of every category's share). So build the bayesDREAM model from the run's
matrices and cells, under the same modality names (the cis feature's negbinom modality
as its primary `gene`).

Groups: bayesDREAM codes them `groupby(covariates).ngroup()`, i.e. in sorted order of the
covariate values (a column of numbers numerically, as pandas sorts a numeric column), its
group 0 the baseline. When our baseline (`baseline_group:`) or order differs, the draws are
put in its order and re-referenced to its first group: divided by it (negbinom's
multiplicative alpha) or minus it (additive). Call `set_technical_groups` with the run's
covariates before `fit_cis`.

The files are written into a hidden folder beside DIR, renamed to DIR at the end: an
interrupted export leaves no DIR that looks finished. An earlier export in DIR is replaced.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from tasks.errors import PipelineError, StoreError
from tasks.results.summary import results_group
from tasks.store import (
    CELL_CHUNK,
    CELLS,
    CIS_KEY,
    FEATURE_CHUNK,
    GROUPS,
    inputs_key,
    is_complete,
    open_root,
    read_strings,
    require_complete,
    results_key,
)

logger = logging.getLogger(__name__)

TARGET = "bayesdream"  # `bayesdream export STORE --to bayesdream DIR`
ALPHA_X_FILE = "alpha_x_prefit.pt"
EXPORT_FILES = (ALPHA_X_FILE, "alpha_y_prefit_*.pt", "features_*.txt")


def alpha_y_file(modality: str) -> str:
    """The file the loader reads as `modalities[modality].alpha_y_prefit`."""
    return f"alpha_y_prefit_{modality}.pt"


def features_file(modality: str) -> str:
    """The feature names of `alpha_y_file(modality)`'s feature axis."""
    return f"features_{modality}.txt"


@dataclass(frozen=True, eq=False)  # holds a zarr group and arrays: compared by identity
class _Modality:
    """One modality's results and which of their features the reference keeps."""

    name: str
    group: zarr.Group
    multiplicative: bool
    keep: np.ndarray  # [T] bool over the results' features
    features: np.ndarray  # [T kept], export order


def export_bayesdream(
    store: str, out_dir: str | Path, *, modalities: Sequence[str] | None = None
) -> dict:
    """Write DIR for `load_technical_fit(input_dir=DIR)`; returns what was written.

    `modalities`: those to write (default: every modality with results). Everything is
    checked before anything is written."""
    out_dir = Path(out_dir)
    root = open_root(store)
    order, labels = reference_group_order(root)
    names = list(dict.fromkeys(modalities or _modalities_with_results(root, store)))
    selected = [_checked_modality(store, root, name, labels) for name in names]
    cis = require_complete(root, CIS_KEY, "sample") if CIS_KEY in root else None
    refuse_foreign_folder(out_dir)
    written: dict[str, list[int]] = {}  # file name -> shape
    with _staged(out_dir) as staging:
        for mod in selected:
            alpha = reference_effects(
                mod.group, "alpha_y", order, multiplicative=mod.multiplicative
            )
            written[alpha_y_file(mod.name)] = _save(
                staging / alpha_y_file(mod.name), alpha[:, :, mod.keep]
            )
            (staging / features_file(mod.name)).write_text("".join(f"{f}\n" for f in mod.features))
        if cis is not None:
            alpha_x = reference_effects(cis, "alpha_x", order, multiplicative=True)
            written[ALPHA_X_FILE] = _save(staging / ALPHA_X_FILE, alpha_x)
    ordered = [labels[c] for c in order]
    reordered = not np.array_equal(order, np.arange(len(order)))
    logger.info(
        "Wrote %s to %s; groups in bayesDREAM's order %s%s",
        written,
        out_dir,
        ordered,
        (f" (ours: {labels}; re-referenced to '{ordered[0]}')" if reordered else ""),
    )
    return {"dir": str(out_dir), "shapes": written, "groups": ordered, "reordered": reordered}


def _modalities_with_results(root: zarr.Group, store: str) -> list[str]:
    """Every modality whose `technical/<m>` is complete (not the cis group)."""
    keys = sorted(root["technical"].group_keys()) if "technical" in root else []
    names = [k for k in keys if results_key(k) != CIS_KEY and is_complete(root, results_key(k))]
    if not names:
        raise StoreError(
            f"Store '{store}' has no complete 'technical/<modality>' results to hand off; "
            "run `bayesdream run <config>` to the end first."
        )
    return names


def _checked_modality(store: str, root: zarr.Group, name: str, labels: list[str]) -> _Modality:
    """The modality's results, checked against the groups; its features bayesDREAM keeps."""
    group = results_group(store, name)  # StoreError naming the key when absent or incomplete
    features = read_strings(group, "feature_names")
    shape = group["alpha_y_add"].shape
    own_labels = list(read_strings(group, "group_labels"))
    if own_labels != labels or shape[1:3] != (len(labels), len(features)):
        raise StoreError(
            f"Store key '{results_key(name)}' does not match '{GROUPS}': its alpha_y_add is "
            f"{shape} over groups {own_labels}, expected [S, {len(labels)}, {len(features)}] "
            f"over {labels}; rerun `bayesdream run` on this store."
        )
    keep = _kept_features(root, name, features, str(group.attrs.get("distribution")))
    multiplicative = group.attrs.get("effect_type") == "multiplicative"
    return _Modality(name, group, multiplicative, keep, features[keep])


def _kept_features(root: zarr.Group, name: str, features: np.ndarray, distribution: str):
    """[T] bool over the results' features (the inputs' without the cis feature): False
    where the feature is constant over the cells, as bayesDREAM drops it."""
    names = read_strings(root[inputs_key(name)], "feature_names")
    cis = root[CIS_KEY].attrs if CIS_KEY in root else {}
    in_results = names != (cis.get("feature") if cis.get("modality") == name else None)
    if not np.array_equal(names[in_results], features):
        raise StoreError(
            f"Store keys '{results_key(name)}' and '{inputs_key(name)}' list different "
            "features (the results are from other inputs); rerun `bayesdream run` on this store."
        )
    return ~constant_features(root, name, distribution)[in_results]


def reference_group_order(root: zarr.Group) -> tuple[np.ndarray, list[str]]:
    """(our group codes in bayesDREAM's code order, our labels in our code order)."""
    groups = require_complete(root, GROUPS, "groups")
    labels = read_strings(groups, "labels").tolist()  # Python str
    codes, first_cell = np.unique(groups["code"][...], return_index=True)
    first_cell = first_cell[codes >= 0]  # one cell of each group, in code order
    covariates = root[CELLS]["covariates"]
    columns = [read_strings(covariates, c)[first_cell] for c in groups.attrs["covariates"]]
    rows = list(zip(*columns, strict=True)) if columns else [() for _ in labels]
    return reference_order(rows), labels


def reference_order(rows: Sequence[tuple[str, ...]]) -> np.ndarray:
    """Indices of `rows` (one tuple of covariate values per group) in pandas' sorted
    groupby order: tuple by tuple, a column whose values all read as finite numbers
    compared as numbers, any other column as text."""
    keys = [_column_keys(column) for column in zip(*rows, strict=True)]
    return np.asarray(sorted(range(len(rows)), key=lambda i: tuple(k[i] for k in keys)), int)


def _column_keys(values: Sequence[str]) -> list[float] | list[str]:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return list(values)
    return numbers if all(math.isfinite(x) for x in numbers) else list(values)


def reference_effects(
    group: zarr.Group, prefix: str, order: np.ndarray, *, multiplicative: bool
) -> np.ndarray:
    """`<prefix>` draws [S, C, ...] float32 with the groups in `order`, row 0 the baseline:
    2 ** (log2 effect - the new baseline's) or additive effect - the new baseline's. In our
    own order the stored multiplicative draws are taken as they are (row 0 is exactly 1)."""
    if multiplicative and np.array_equal(order, np.arange(len(order))):
        return np.asarray(group[f"{prefix}_mult"][...], dtype=np.float32)
    effects = np.asarray(group[f"{prefix}_add"][...], dtype=np.float32)[:, order]
    effects = effects - effects[:, :1]
    return np.exp2(effects) if multiplicative else effects


def _ratio(block: np.ndarray, denominator: np.ndarray | None) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, block / denominator, np.nan)


def _shares(block: np.ndarray, denominator: np.ndarray | None) -> np.ndarray:
    totals = block.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(totals > 0, block / totals, 0.0)


#: what bayesDREAM compares across cells to find a constant feature (default: the values)
COMPARED: dict[str, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {
    "binomial": _ratio,
    "multinomial": _shares,
}


def constant_features(root: zarr.Group, name: str, distribution: str) -> np.ndarray:
    """[T] bool over `inputs/<name>`: the compared value is the same in every cell the
    matrix has (NaN skipped), read block by block; bayesDREAM drops such features."""
    inputs = root[inputs_key(name)]
    counts = inputs["counts"]
    denominator = inputs["denominator"] if "denominator" in inputs else None
    present = inputs["present"][...]
    compare = COMPARED.get(distribution, lambda block, _: block)
    low = np.full((counts.shape[0], *counts.shape[2:]), np.inf)
    high = -low
    for f0 in range(0, counts.shape[0], FEATURE_CHUNK):
        rows = slice(f0, f0 + FEATURE_CHUNK)
        for c0 in range(0, counts.shape[1], CELL_CHUNK):
            cells = slice(c0, c0 + CELL_CHUNK)
            if not (has := present[cells]).any():
                continue
            den = None if denominator is None else denominator[rows, cells][:, has]
            values = compare(counts[rows, cells][:, has], den)
            missing = np.isnan(values)
            low[rows] = np.minimum(low[rows], np.where(missing, np.inf, values).min(axis=1))
            high[rows] = np.maximum(high[rows], np.where(missing, -np.inf, values).max(axis=1))
    return ~(high > low).reshape(counts.shape[0], -1).any(axis=1)


def _save(path: Path, values: np.ndarray) -> list[int]:
    """A CPU float32 tensor (the loader's bare `torch.load` reads it); returns its shape."""
    torch.save(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), path)
    return list(values.shape)


def refuse_foreign_folder(out_dir: Path) -> None:
    """DIR may be new, empty or an earlier export (replaced whole); anything else is refused."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PipelineError(f"--to {TARGET} '{out_dir}' is a file; give a folder (new or empty).")
    foreign = sorted(
        entry.name
        for entry in os.scandir(out_dir)
        if not any(fnmatch.fnmatchcase(entry.name, p) for p in EXPORT_FILES)
    )
    if foreign:
        raise PipelineError(
            f"--to {TARGET} '{out_dir}' holds files that are not an earlier export "
            f"({', '.join(foreign[:5])}); the export replaces the whole folder, so give a "
            "new or empty folder, or remove them."
        )


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A hidden folder beside `out_dir` to write into, renamed to `out_dir` on success
    (an earlier export there is moved aside first, then deleted); removed on failure."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "export")
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
