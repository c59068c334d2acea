"""One page per run: `<store>.reports/index.html`, self-contained (figures inside the file
as `data:` PNGs, the style inline, no script, nothing fetched).

What it shows, all read from the store:
- the run: store, flow run, start and end, status, versions;
- the technical groups: NTC cells, cells and fit cells of each, which is the baseline and
  why, groups dropped for having no NTC cells;
- wall time and peak memory of every step (the store's `steps`, from `tasks.stage_meter`);
- per modality: the fit (distribution, guide, SVI steps and why the fit stopped, the loss
  trace), the features excluded by each NTC filter (with their names), the cis feature's
  effect per group (when the modality has one), the features the fit flagged, and per group each feature's effect against its baseline mean with its
  interval width (`tasks.results.page_figures`); the baseline mean is the posterior mean
  of `mu_ntc` (of `probs_baseline` for multinomial modalities).

`write_run_page` writes the page atomically (a temporary file, then a rename), so a page
is whole or absent; `remove_run_page` withdraws it when a new run on the store starts, so
an interrupted run leaves no page describing a store it changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bayesdream_model.distributions import get_family
from tasks.errors import StoreError
from tasks.filter.flags import read_flags
from tasks.groups import NTC, GroupAssignment, read_groups
from tasks.results.html_parts import (
    MAX_NAMES,
    STYLE,
    details,
    escape,
    figure,
    key_values,
    number,
    section,
    table,
)
from tasks.results.page_figures import GroupPanel, group_png
from tasks.results.report import (
    EXCLUDED,
    FIT,
    REASONS,
    SCALE,
    draw_mean,
    exclusion_table,
    loss_png,
    reports_folder,
)
from tasks.results.summary import effect_summary, finished_modalities
from tasks.store import (
    CELLS,
    CIS_KEY,
    COMPLETE,
    FIT_FLAGS,
    fit_key,
    open_root,
    read_strings,
    results_key,
)

logger = logging.getLogger(__name__)

PAGE = "index.html"
REASON_TEXT = {
    "ntc_zero_count": "no count in any NTC cell",
    "ntc_zero_std": "the same value in every NTC cell",
    "ntc_single_category": "one category holds every NTC count",
}
FLAG_TEXT = {
    "baseline_no_counts": "no count in the baseline group's NTC cells while another group has "
    "some: the data bound the effects from one side only, so the interval is the prior's "
    "on that side",
    "start_not_converged": "the Laplace start kept the initial values for these features",
}
STAGES = (  # (key in a modality's steps, what the page calls it)
    ("ingest", "ingest"),
    ("filters", "NTC filters"),
    ("fit", "fit (SVI)"),
    ("sample", "posterior draws"),
)
RUN_STAGES = (
    ("pre-flight", "pre-flight checks"),
    ("create-store", "store and cells"),
    ("groups", "technical groups"),
)
#: the x axis of the effect figures, by effect type: what the baseline site holds, log axis?
BASELINE_AXIS = {
    "multiplicative": ("mean, normalised counts", True),
    "logit": ("proportion", False),
    "additive": ("mean, data units", False),
}


def page_path(store: str | Path) -> Path:
    """`<store>.reports/index.html`."""
    return reports_folder(store) / PAGE


def remove_run_page(store: str | Path) -> None:
    """Withdraw an earlier run's page (a new run on the store has started)."""
    page_path(store).unlink(missing_ok=True)


def write_run_page(
    root: zarr.Group, store: str | Path, modalities: Iterable[str], *, flow_run: str | None = None
) -> Path:
    """Write `<store>.reports/index.html` for `modalities` of a finished store."""
    path = page_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_page(root, store, list(modalities), flow_run=flow_run)
    partial = path.with_name(f".{PAGE}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # a disk-full write leaves no half page behind
    logger.info("Run page: %s", path)
    return path


def rewrite_run_page(store: str, modalities: list[str] | None = None) -> Path:
    """The `report` command: the page of a store's finished modalities (all by default)."""
    root = open_root(store)
    have = finished_modalities(root)
    missing = [name for name in modalities or [] if name not in have]
    if missing or not have:
        raise StoreError(
            f"{store}: no finished results for {missing or 'any modality'}; modalities with "
            f"results: {have}."
        )
    return write_run_page(root, store, modalities or have)


def render_page(
    root: zarr.Group, store: str | Path, modalities: list[str], *, flow_run: str | None = None
) -> str:
    """The page's HTML."""
    steps = dict(root.attrs.get("steps", {}))
    parts = [
        _run_section(root, store, modalities, flow_run),
        _groups_section(root),
        _stages_section(steps, modalities, run_seconds(root.attrs)),
        *(_modality_section(root, store, name) for name in modalities),
    ]
    nav = " · ".join(
        f'<a href="#{anchor}">{escape(text)}</a>'
        for anchor, text in [("groups", "groups"), ("stages", "time and memory")]
        + [(f"m-{name}", name) for name in modalities]
    )
    title = f"bayesDREAM technical fit: {Path(store).name}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(title)}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            f"<nav>{nav}</nav>",
            *parts,
            "</body></html>",
        ]
    )


# --- the run -----------------------------------------------------------------------------


def _run_section(root: zarr.Group, store, modalities: list[str], flow_run: str | None) -> str:
    attrs = root.attrs
    provenance = dict(attrs.get("provenance", {}))
    versions = provenance.get("versions", {})
    rows = {
        "store": str(Path(store).expanduser().resolve()),
        "status": "complete" if attrs.get(COMPLETE) else "not complete (the run did not finish)",
        "flow run": flow_run or "-",
        "started / finished": f"{attrs.get('started', '?')} / {attrs.get('finished', '?')}",
        "modalities on this page": ", ".join(modalities),
        "host / user": f"{provenance.get('host', '?')} / {provenance.get('user', '?')}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "git commit": provenance.get("git_commit") or "-",
    }
    return section("run", "The run", key_values(rows))


# --- groups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRow:
    label: str
    baseline: bool
    ntc_cells: int
    cells: int
    fit_cells: int


def group_rows(root: zarr.Group, groups: GroupAssignment) -> list[GroupRow]:
    """Per technical group (code order, the baseline first): NTC cells, cells, fit cells."""
    is_ntc = read_strings(root[CELLS], "target") == NTC
    code = groups.code
    kept = code >= 0
    n = len(groups.labels)
    counts = {
        "ntc": np.bincount(code[kept & is_ntc], minlength=n),
        "all": np.bincount(code[kept], minlength=n),
        "fit": np.bincount(code[kept & groups.fit], minlength=n),
    }
    return [
        GroupRow(label, c == 0, int(counts["ntc"][c]), int(counts["all"][c]), int(counts["fit"][c]))
        for c, label in enumerate(groups.labels)
    ]


def _groups_section(root: zarr.Group) -> str:
    groups = read_groups(root)
    counted = group_rows(root, groups)
    rows = [
        [
            row.label + (" (baseline)" if row.baseline else ""),
            f"{row.ntc_cells:,}",
            f"{row.cells:,}",
            f"{row.fit_cells:,}",
        ]
        for row in counted
    ]
    body = [
        f"<p>Baseline: <b>{escape(groups.baseline)}</b> ({escape(groups.baseline_rule)}). Every other "
        "group's effects are relative to it.</p>",
        table(
            ["group", "NTC cells", "cells", "cells fit"],
            rows,
            classes=["", "n", "n", "n"],
            marked=[row.baseline for row in counted],
        ),
    ]
    if groups.dropped:
        dropped = ", ".join(f"{escape(k)} ({v:,} cells)" for k, v in groups.dropped.items())
        body.append(f"<p>Dropped, no NTC cells: {dropped}.</p>")
    return section("groups", "Technical groups", "\n".join(body))


# --- time and memory ---------------------------------------------------------------------


def stage_rows(steps: dict[str, Any], modalities: list[str]) -> list[list[str]]:
    """[step, modality, seconds, peak RSS, peak GPU, ran or skipped] per recorded step."""
    rows = []
    recorded = [(key, text, "", steps.get(key)) for key, text in RUN_STAGES]
    for name in modalities:
        recorded += [(key, text, name, steps.get(name, {}).get(key)) for key, text in STAGES]
    for _key, text, modality, summary in recorded:
        if not isinstance(summary, dict) or "seconds" not in summary:
            continue
        gpu = summary.get("peak_gpu_bytes")
        rows.append(
            [
                text,
                modality,
                f"{float(summary['seconds']):.2f}",
                _mib(summary.get("peak_rss_bytes")),
                _mib(gpu) if gpu is not None else "-",
                "skipped (inputs unchanged)" if summary.get("skipped") else "ran",
            ]
        )
    return rows


def _stages_section(steps: dict[str, Any], modalities: list[str], wall: str) -> str:
    rows = stage_rows(steps, modalities)
    header = ["step", "modality", "wall s", "peak memory MiB", "peak GPU MiB", ""]
    classes = ["", "", "n", "n", "n", ""]
    if all(row[4] == "-" for row in rows):  # no step used a GPU: no column for it
        header, classes = header[:4] + header[5:], classes[:4] + classes[5:]
        rows = [row[:4] + row[5:] for row in rows]
    note = (
        f"<p>The whole run: {escape(wall)} s from start to finish. Peak memory is the resident "
        "memory of the process that ran the step, highest while it ran (steps that ran side "
        "by side in one process share it).</p>"
    )
    return section(
        "stages", "Time and memory per step", note + table(header, rows, classes=classes)
    )


def run_seconds(attrs) -> str:
    """Seconds from the run's start to its finish ('?' where either is missing)."""
    try:
        started = datetime.fromisoformat(attrs["started"])
        finished = datetime.fromisoformat(attrs["finished"])
    except (KeyError, TypeError, ValueError):
        return "?"
    return f"{(finished - started).total_seconds():.1f}"


def _mib(value) -> str:
    return "?" if value is None else f"{int(value) / 2**20:,.0f}"


# --- a modality --------------------------------------------------------------------------


def _modality_section(root: zarr.Group, store, name: str) -> str:
    group = root[results_key(name)]
    attrs = dict(group.attrs)
    fit_attrs = dict(root[fit_key(name)].attrs) if fit_key(name) in root else {}
    body = [
        _fit_table(attrs, fit_attrs),
        "<h3>Loss trace</h3>",
        f"<p>Why the fit stopped: {escape(str(attrs.get('stop_reason', '?')))}</p>",
        figure(loss_png(group["loss"][...]), f"SVI loss of {name}"),
        _excluded_block(root, name),
        *_cis_block(root, name),
        *_effects_block(root, store, name),
    ]
    return section(f"m-{name}", f"Modality {name}", "\n".join(body))


def _fit_table(attrs: dict, fit_attrs: dict) -> str:
    laplace = fit_attrs.get("laplace_start") or {}
    rows = {
        "distribution / effect": f"{attrs.get('distribution')} / {attrs.get('effect_type')}",
        "guide / device": f"{attrs.get('guide')} / {attrs.get('device')}",
        "SVI steps": attrs.get("niters_run"),
        "Laplace start": (
            f"{laplace.get('iterations')} Newton iterations, "
            f"{laplace.get('features_kept_start', 0)} features kept their start"
            if laplace
            else "-"
        ),
        "fit s / draws s": f"{number(attrs.get('fit_seconds'))} / "
        f"{number(attrs.get('sampling_seconds'))}",
        "posterior draws": attrs.get("nsamples"),
    }
    return key_values(rows)


def _excluded_block(root: zarr.Group, name: str) -> str:
    flags = read_flags(root, name).as_dict()
    total = len(flags[EXCLUDED])
    rows = [[reason, REASON_TEXT[reason], f"{int(flags[reason].sum()):,}"] for reason in REASONS]
    rows.append([EXCLUDED, "any of these: left out of the fit", f"{int(flags[EXCLUDED].sum()):,}"])
    rows.append([FIT, "fit", f"{int(flags[FIT].sum()):,}"])
    parts = [
        "<h3>Features excluded by the NTC filters</h3>",
        f"<p>{total:,} features in the matrix.</p>",
        table(["reason", "meaning", "features"], rows, classes=["", "", "n"]),
    ]
    excluded = exclusion_table(root, name)
    if excluded["feature"]:
        listed = [
            [feature] + [", ".join(r for r in REASONS if excluded[r][i])]
            for i, feature in enumerate(excluded["feature"][:MAX_NAMES])
        ]
        parts.append(
            details(
                f"the {len(excluded['feature']):,} excluded features",
                table(["feature", "reasons"], listed),
                len(excluded["feature"]),
            )
        )
    return "\n".join(parts)


def _cis_block(root: zarr.Group, name: str) -> list[str]:
    """The cis feature's effect per group (`technical/cis`), when this modality has one."""
    if CIS_KEY not in root or root[CIS_KEY].attrs.get("modality") != name:
        return []
    cis = root[CIS_KEY]
    draws = cis["alpha_x_add"][...].astype(np.float64)  # [S, C], 0 for the baseline
    scale = SCALE.get(root[results_key(name)].attrs.get("effect_type"), "data units")
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    labels = read_strings(cis, "group")
    rows = [
        [str(label), f"{m:+.3f}", f"{lo:+.3f}", f"{hi:+.3f}"]
        for label, m, lo, hi in zip(labels, draws.mean(axis=0), low, high, strict=True)
    ]
    flagged = [flag for flag in FIT_FLAGS if cis.attrs.get(flag)]
    note = f" Flagged: {', '.join(flagged)}." if flagged else ""
    return [
        f"<h3>The cis feature {escape(cis.attrs.get('feature', '?'))} ({escape(scale)})</h3>",
        f"<p>Its effect per group, against the baseline {escape(labels[0])}.{escape(note)}</p>",
        table(["group", "mean", "q05", "q95"], rows, classes=["", "n", "n", "n"]),
    ]


def _effects_block(root: zarr.Group, store, name: str) -> list[str]:
    """The fit's flags, then one figure per non-baseline group."""
    summary = effect_summary(str(store), name)
    keep = summary.flags[FIT]
    fit_flags = {flag: summary.flags[flag][keep] for flag in FIT_FLAGS if flag in summary.flags}
    parts = _flagged_block(summary.features[keep], fit_flags)
    labels = [str(label) for label in summary.groups]
    parts.append(f"<h3>Effects against the baseline mean, per group ({escape(summary.scale)})</h3>")
    if len(labels) < 2:
        parts.append("<p>One technical group: there are no effects to show.</p>")
        return parts
    group = root[results_key(name)]
    family = get_family(str(group.attrs["distribution"]))
    what, log_x = BASELINE_AXIS[family.spec.effect_type]
    axis = f"baseline {what} ({family.baseline_site})"
    baseline_mean = draw_mean(group[family.baseline_site], feature_axis=1)[keep]  # [t(, K)]
    parts.append(
        f"<p>One point per fit feature{' and category' if summary.n_categories else ''}; "
        f"the baseline {escape(labels[0])}'s own effect is fixed at 0. Flagged features are "
        "marked.</p>"
    )
    for c in range(1, len(labels)):
        stats = {key: summary.stats[key][c][keep] for key in ("mean", "q05", "q95")}
        shape = stats["mean"].shape
        panel = GroupPanel(
            label=labels[c],
            baseline=labels[0],
            mean=stats["mean"].ravel(),
            q05=stats["q05"].ravel(),
            q95=stats["q95"].ravel(),
            baseline_mean=_per_point(baseline_mean, shape),
            flags={flag: _per_point(mask, shape) for flag, mask in fit_flags.items()},
            effect_scale=summary.scale,
            baseline_axis=axis,
            log_x=log_x,
        )
        parts.append(figure(group_png(panel), f"effects of {labels[c]} in {name}"))
    return parts


def _flagged_block(features: np.ndarray, fit_flags: dict[str, np.ndarray]) -> list[str]:
    """Per flag of the fit: what it means, how many features carry it, and their names."""
    rows = [
        [flag, FLAG_TEXT.get(flag, ""), f"{int(mask.sum()):,}"] for flag, mask in fit_flags.items()
    ]
    parts = [
        "<h3>Features the fit flagged</h3>",
        table(["flag", "meaning", "features"], rows, classes=["", "", "n"]),
    ]
    for flag, mask in fit_flags.items():
        if mask.any():
            names = [[str(f)] for f in features[mask][:MAX_NAMES]]
            count = int(mask.sum())
            parts.append(
                details(f"the {count:,} features flagged {flag}", table(["feature"], names), count)
            )
    return parts


def _per_point(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-feature values [t] (or already [t, K]) laid out like effects of `shape`,
    flattened: one value per (feature, category) point."""
    per_feature = values.reshape(shape[0], -1)
    return np.broadcast_to(per_feature, (shape[0], int(np.prod(shape[1:])))).ravel()
