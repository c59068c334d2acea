"""The run page's figures, as PNG bytes: one per non-baseline group of a modality.

Each shows every fit feature (every (feature, category) for multinomial effects) against
its baseline mean, the posterior mean of `mu_ntc`:
- left, the effect's posterior mean with its 90 % interval (q05 to q95) as a grey bar;
- right, that interval's width, the posterior's own statement of how much the data told.

Features the fit flagged (`baseline_no_counts`: no count in the baseline group, so their
effects are bounded from one side only; `start_not_converged`) are drawn on top in their
own colour and marker, and named in the legend with their numbers.

matplotlib is imported here only, drawing on `Figure` objects (no pyplot state).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.results.report import figure_png

FLAG_STYLE = {
    "baseline_no_counts": {"color": "#d62728", "marker": "x"},
    "start_not_converged": {"color": "#9467bd", "marker": "D"},
}
FEATURE_COLOR = "#1f77b4"
INTERVAL_COLOR = "#bbbbbb"


@dataclass(frozen=True, eq=False)  # holds arrays
class GroupPanel:
    """One group's effects over the fit features (flattened over categories)."""

    label: str
    baseline: str
    mean: np.ndarray  # [n]
    q05: np.ndarray  # [n]
    q95: np.ndarray  # [n]
    baseline_mean: np.ndarray  # [n]
    flags: dict[str, np.ndarray]  # name -> [n] bool, the fit's flags
    effect_scale: str  # "log2", "logit", "data units"
    baseline_axis: str  # the x axis's label
    log_x: bool  # baseline means span decades (counts): log axis


def group_png(panel: GroupPanel) -> bytes:
    """The two panels of one group (see the module docstring)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
    ax_effect, ax_width = fig.subplots(1, 2)
    x = _x_values(panel)
    width = panel.q95 - panel.q05
    flagged = np.zeros(len(x), dtype=bool)
    for mask in panel.flags.values():
        flagged |= mask
    # every interval in one line broken by NaNs: one path to transform, not one per feature
    bars_x = np.column_stack([x, x, np.full_like(x, np.nan)]).ravel()
    bars_y = np.column_stack([panel.q05, panel.q95, np.full_like(x, np.nan)]).ravel()
    ax_effect.plot(bars_x, bars_y, color=INTERVAL_COLOR, lw=0.6, zorder=1)
    plain = ~flagged
    size = 2.5 if len(x) > 2000 else 3.5
    dots = {"ls": "", "marker": "o", "ms": size, "mew": 0, "color": FEATURE_COLOR, "zorder": 2}
    ax_effect.plot(x[plain], panel.mean[plain], label=f"features ({int(plain.sum())})", **dots)
    ax_width.plot(x[plain], width[plain], **dots)
    for name, mask in panel.flags.items():
        if not mask.any():
            continue
        style = FLAG_STYLE.get(name, {"color": "#ff7f0e", "marker": "s"})
        marks = {"ls": "", "ms": 5, "zorder": 3, **style}
        ax_effect.plot(x[mask], panel.mean[mask], label=f"{name} ({int(mask.sum())})", **marks)
        ax_width.plot(x[mask], width[mask], **marks)
    ax_effect.axhline(0.0, color="black", lw=0.8, zorder=0)
    for ax in (ax_effect, ax_width):
        if panel.log_x:
            ax.set_xscale("log")
        ax.set_xlabel(panel.baseline_axis)
        ax.autoscale_view()
    ax_effect.set_ylabel(f"effect vs {panel.baseline} ({panel.effect_scale})")
    ax_effect.set_title(f"{panel.label}: posterior mean and 90 % interval", fontsize="medium")
    ax_width.set_ylabel(f"90 % interval width ({panel.effect_scale})")
    ax_width.set_title(f"{panel.label}: interval width", fontsize="medium")
    ax_effect.legend(loc="upper right", fontsize="small")  # "best" scans every point: slow
    return figure_png(fig)


def _x_values(panel: GroupPanel) -> np.ndarray:
    """Baseline means, floored above zero on a log axis (a feature with no baseline count
    has a posterior mean far below the others, never exactly zero, but be safe)."""
    x = np.asarray(panel.baseline_mean, dtype=np.float64)
    if panel.log_x:
        positive = x[x > 0]
        floor = positive.min() if positive.size else 1e-6
        x = np.maximum(x, floor)
    return x
