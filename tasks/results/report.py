"""What a run's report shows, read from the store: excluded features, loss curve, effects.

No Prefect here (`tasks.orchestration.artifacts` publishes). matplotlib is imported by the plotting
functions only (the tables need none of it) and draws on `Figure` objects: no pyplot
state, so modality chains may plot side by side in threads.

The PNGs go beside the store, in `<store>.reports/`, not inside it: zarr 3 warns
("Object at reports is not recognized as a component of a Zarr hierarchy") whenever a
group holding a plain folder is listed or its metadata consolidated.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from tasks.filter.flags import read_flags
from tasks.groups import FIRST_SORTED
from tasks.store import inputs_key, read_strings, results_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REASONS = ("ntc_zero_count", "ntc_zero_std", "ntc_single_category")
EXCLUDED = "ntc_excluded_from_fit"
FIT = "technical_correction_applied"
EFFECT = "alpha_y_add"  # [S, C, T(, K)], 0 for excluded features
BLOCK = 4096  # features read at a time (the results' feature chunk)
SCALE = {"multiplicative": "log2", "logit": "logit", "additive": "data units"}


@dataclass(frozen=True)
class ModalityReport:
    """The markdown (plots embedded as data URIs) and the PNG files written."""

    markdown: str
    files: tuple[Path, ...]


def reports_folder(store: str | Path) -> Path:
    """`<store>.reports/`: beside the store (see the module docstring for why)."""
    path = Path(store)
    return path.with_name(f"{path.name}.reports")


def exclusion_table(root: zarr.Group, name: str) -> dict[str, list]:
    """One row per excluded feature: its name and every exclusion reason (columns)."""
    flags = read_flags(root, name).as_dict()
    names = read_strings(root[inputs_key(name)], "feature_names")
    rows = np.flatnonzero(flags[EXCLUDED])
    table: dict[str, list] = {"feature": names[rows].tolist()}
    table |= {reason: flags[reason][rows].tolist() for reason in REASONS}
    return table


def feature_counts(root: zarr.Group, name: str) -> dict[str, int]:
    """Features flagged by each reason, by any (`ntc_excluded_from_fit`), fit, and in all."""
    flags = read_flags(root, name).as_dict()
    counts = {key: int(flags[key].sum()) for key in (*REASONS, EXCLUDED, FIT)}
    return counts | {"total": len(flags[EXCLUDED])}


def baseline_text(group: zarr.Group) -> str:
    """'K562 (named by baseline_group)' or '… (first in sorted order)': the baseline
    group of `technical/<name>` (its first label in stores that predate the attribute)."""
    attrs = group.attrs
    label = attrs.get("baseline_group") or str(read_strings(group, "group_labels")[0])
    return f"{label} ({attrs.get('baseline_rule', FIRST_SORTED)})"


def write_report(root: zarr.Group, store: str | Path, name: str) -> ModalityReport:
    """Plot `technical/<name>` into `<store>.reports/<name>-*.png`; return the markdown."""
    group = root[results_key(name)]
    labels = read_strings(group, "group_labels")
    scale = SCALE.get(group.attrs.get("effect_type"), "data units")
    pngs = {
        "loss": loss_png(group["loss"][...]),
        "effects": effects_png(posterior_mean_effects(group), labels, scale),
    }
    folder = reports_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for kind, png in pngs.items():
        files.append(folder / f"{name}-{kind}.png")
        files[-1].write_bytes(png)
    lines = [
        f"# Technical fit: modality `{name}`",
        "",
        *_summary_table(group.attrs, feature_counts(root, name), len(labels), baseline_text(group)),
        "",
        "## SVI loss",
        f"![SVI loss of {name}]({data_uri(pngs['loss'])})",
        "",
        f"## Posterior-mean effects `{EFFECT}` ({scale}), fit features, per group",
        f"![Posterior-mean effects of {name}]({data_uri(pngs['effects'])})",
        "",
        "PNG files: " + ", ".join(f"`{path}`" for path in files),
    ]
    return ModalityReport("\n".join(lines), tuple(files))


def _summary_table(attrs, counts: dict[str, int], n_groups: int, baseline: str) -> list[str]:
    """The few numbers worth a glance, as a two-column markdown table."""
    reasons = ", ".join(f"{reason}: {counts[reason]}" for reason in REASONS)
    rows = {
        "distribution": attrs.get("distribution"),
        "guide / device": f"{attrs.get('guide')} / {attrs.get('device')}",
        "SVI steps": attrs.get("niters_run"),
        "stop reason": attrs.get("stop_reason"),
        "fit seconds": _seconds(attrs.get("fit_seconds")),
        "posterior draws": attrs.get("nsamples"),
        "sampling seconds": _seconds(attrs.get("sampling_seconds")),
        "technical groups": n_groups,
        "baseline group (effects relative to it)": baseline,
        "features fit": f"{counts[FIT]} of {counts['total']} in the matrix",
        "features excluded": f"{counts[EXCLUDED]} ({reasons})",
    }
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows.items())]


def _seconds(value) -> str:
    return "?" if value is None else f"{float(value):.1f}"


def posterior_mean_effects(group: zarr.Group) -> np.ndarray:
    """[C, n] posterior means of `alpha_y_add` over the fit features (and categories)."""
    means = draw_mean(group[EFFECT], feature_axis=2)  # [C, T(, K)]
    keep = ~group[EXCLUDED][...]
    return means[:, keep].reshape(means.shape[0], -1)


def draw_mean(array: zarr.Array, *, feature_axis: int) -> np.ndarray:
    """The mean over draws (axis 0) of a results array, `BLOCK` features at a time (the
    result's axes but the first; `feature_axis` counts the draw axis)."""
    blocks = []
    for start in range(0, array.shape[feature_axis], BLOCK):
        index = [slice(None)] * array.ndim
        index[feature_axis] = slice(start, start + BLOCK)
        blocks.append(array[tuple(index)].astype(np.float64).mean(axis=0))
    return np.concatenate(blocks, axis=feature_axis - 1)


def loss_png(loss: np.ndarray) -> bytes:
    """The loss per SVI step and its running mean (log scale when it spans decades)."""
    from matplotlib.figure import Figure

    loss = np.asarray(loss, dtype=np.float64)
    steps = np.arange(1, len(loss) + 1)
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    window = max(1, len(loss) // 50)
    faint = {"lw": 0.6, "alpha": 0.5} if window > 1 else {"lw": 1.2}  # under a running mean
    ax.plot(steps, loss, label="loss", **faint)
    if window > 1:
        running = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], running, lw=1.5, label=f"mean of {window} steps")
    finite = loss[np.isfinite(loss)]
    if finite.size and finite.min() > 0 and finite.max() > 10 * finite.min():
        ax.set_yscale("log")  # only where the loss fell by more than a factor of ten
    ax.set(xlabel="SVI step", ylabel="loss (negative ELBO)")
    ax.legend(loc="upper right")
    return figure_png(fig)


def effects_png(means: np.ndarray, labels: np.ndarray, scale: str) -> bytes:
    """Histograms of [C, n] posterior-mean effects, one per group; fixed groups listed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    finite = means[np.isfinite(means)]
    n_bins = min(40, max(5, int(np.sqrt(finite.size / max(len(labels), 1)))))
    bins = np.histogram_bin_edges(finite, bins=n_bins) if finite.size else n_bins
    fixed = []
    for label, values in zip(labels, means, strict=True):
        values = values[np.isfinite(values)]
        if values.size == 0 or np.ptp(values) == 0:  # the baseline group: fixed, not learnt
            fixed.append(f"{label} = {values[0]:g}" if values.size else f"{label}: none")
            continue
        ax.hist(values, bins=bins, histtype="step", lw=1.5, label=str(label))
    ax.set(xlabel=f"posterior mean {EFFECT} ({scale})", ylabel="features")
    if fixed:
        ax.set_title("fixed (baseline): " + ", ".join(fixed), fontsize="small")
    if len(fixed) < len(labels):
        ax.legend(loc="upper right", fontsize="small")
    return figure_png(fig)


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG as a `data:` URI, for markdown that must carry its images."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
