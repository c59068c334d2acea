"""The run's page, `<store>.reports/index.html`: what it says is what the store and the
inputs say, it is self-contained, a Prefect artifact links it, a new run withdraws it until
it finishes, and (second tier) a real headless Chromium loads every figure.

The screen: the demo's cells (HEL, K562, TF1) with `baseline_group: TF1` (not the first
in sorted order), one gene with no count in any TF1 cell (so the fit flags it
`baseline_no_counts`), the demo's all-zero and constant genes (excluded by the NTC
filters), and a multinomial modality on the same cells.
"""

from __future__ import annotations

import logging
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
import zarr

import tasks.results.run_page as run_page
import tasks.steps
from bayesdream_model.simulate import simulate_multinomial
from flows.technical_fit import technical_fit
from tasks.demo import CONSTANT_FEATURE, ZERO_FEATURE, write_demo_inputs
from tasks.orchestration.artifacts import page_artifact_key
from tasks.results.summary import effect_summary
from tasks.store import COMPLETE, results_key

BASELINE = "TF1"
OFF_GENE = "MYB"  # no count in any TF1 cell
N_CELLS, K = 240, 3
BROWSER_REQUIRED = os.environ.get("BAYESDREAM_REQUIRE_BROWSER") == "1"


def _write_screen(folder: Path) -> Path:
    config = write_demo_inputs(folder, n_cells=N_CELLS, n_features=10, niters=60, nsamples=20)
    cells = pd.read_csv(folder / "cells.csv")
    counts = pd.read_csv(folder / "gene_counts.csv", index_col=0)
    counts.loc[OFF_GENE, cells["cell_line"].eq(BASELINE).to_numpy()] = 0
    counts.to_csv(folder / "gene_counts.csv")
    donor = simulate_multinomial(n_cells=N_CELLS, n_features=4, n_groups=3, n_categories=K, seed=2)
    np.save(folder / "donor.npy", donor.y)
    (folder / "cells.txt").write_text("\n".join(cells["cell"]) + "\n")
    (folder / "donor_names.txt").write_text("\n".join(f"donor{i}" for i in range(4)) + "\n")
    spec = yaml.safe_load(config.read_text())
    spec["baseline_group"] = BASELINE
    spec["modalities"]["donor"] = {
        "distribution": "multinomial",
        "counts": "donor.npy",
        "features": "donor_names.txt",
        "cells": "cells.txt",
    }
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The finished run's folder and its Prefect artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    config = _write_screen(tmp_path_factory.mktemp("page") / "screen")
    state = technical_fit(str(config), return_state=True)
    assert state.is_completed(), state
    run_filter = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=run_filter))
    return config.parent, {artifact.key: artifact for artifact in found}


def _store(folder: Path) -> Path:
    return folder / "results" / "run.zarr"


def _page(folder: Path) -> Path:
    return folder / "results" / "run.zarr.reports" / "index.html"


class _Page(HTMLParser):
    """The page's tables (rows of cell texts), image sources and links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, first_header: str) -> list[list[str]]:
        """The first table whose first header cell is `first_header` (header row dropped)."""
        for table in self.tables:
            if table and table[0][0] == first_header:
                return table[1:]
        raise AssertionError(f"no table headed '{first_header}'")


def _parsed(folder: Path) -> _Page:
    return _Page(_page(folder).read_text(encoding="utf-8"))


def test_the_page_is_self_contained_and_linked_from_the_runs_artifacts(finished) -> None:
    folder, artifacts = finished
    page = _parsed(folder)
    assert page.images and all(
        image["src"].startswith("data:image/png;base64,") for image in page.images
    )
    assert all(link.startswith("#") for link in page.links)  # nothing outside the file
    assert not page.tags & {"script", "link", "iframe", "object"}
    link = artifacts[page_artifact_key(_store(folder))]
    assert _page(folder).resolve().as_uri() in link.data  # kept as markdown: [text](uri)
    for name in ("gene", "donor"):
        report = next(a for k, a in artifacts.items() if k.startswith(f"report-{name}-"))
        assert _page(folder).resolve().as_uri() in report.data


def test_the_groups_table_counts_each_groups_ntc_cells_and_marks_the_named_baseline(
    finished,
) -> None:
    folder, _ = finished
    cells = pd.read_csv(folder / "cells.csv")
    ntc = cells[cells["target"] == "ntc"].groupby("cell_line").size()
    every = cells.groupby("cell_line").size()
    rows = _parsed(folder).table("group")
    assert rows[0][0] == f"{BASELINE} (baseline)"  # the named baseline first, marked
    assert [row[0] for row in rows[1:]] == ["HEL", "K562"]
    for label, n_ntc, n_cells, n_fit in rows:
        line = label.removesuffix(" (baseline)")
        assert int(n_ntc.replace(",", "")) == ntc[line]
        assert int(n_cells.replace(",", "")) == every[line]
        assert int(n_fit.replace(",", "")) == ntc[line]  # NTC cells are the fit's cells
    assert f"Baseline: <b>{BASELINE}</b> (named by baseline_group)" in _page(folder).read_text()


def test_excluded_features_are_counted_and_named_by_reason(finished) -> None:
    folder, _ = finished
    page = _parsed(folder)
    counts = {row[0]: int(row[2]) for row in page.table("reason")}  # the first modality: gene
    assert counts["ntc_zero_count"] == 1 and counts["ntc_zero_std"] >= 1
    assert counts["ntc_excluded_from_fit"] == 2
    named = {row[0]: row[1] for row in page.table("feature") if len(row) == 2}
    assert named[ZERO_FEATURE] == "ntc_zero_count, ntc_zero_std"
    assert named[CONSTANT_FEATURE] == "ntc_zero_std"


def test_each_groups_figure_is_the_stored_posterior_with_the_flagged_gene_marked(
    finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = finished
    panels = []
    monkeypatch.setattr(run_page, "group_png", lambda panel: panels.append(panel) or b"png")
    root = zarr.open_group(str(_store(folder)), mode="r")
    run_page.render_page(root, _store(folder), ["gene", "donor"])
    assert [(p.label, p.baseline) for p in panels] == [
        (label, BASELINE) for label in ("HEL", "K562")
    ] * 2
    for name, pair in (("gene", panels[:2]), ("donor", panels[2:])):
        summary = effect_summary(str(_store(folder)), name)
        fit = summary.flags["technical_correction_applied"]
        site = "probs_baseline" if name == "donor" else "mu_ntc"
        mu = root[results_key(name)][site][...].astype(np.float64).mean(axis=0)[fit]
        for c, panel in enumerate(pair, start=1):
            for stat in ("mean", "q05", "q95"):
                np.testing.assert_array_equal(
                    getattr(panel, stat), summary.stats[stat][c][fit].ravel()
                )
            np.testing.assert_array_equal(panel.baseline_mean, mu.ravel())
    gene = effect_summary(str(_store(folder)), "gene")
    fit_names = gene.features[gene.flags["technical_correction_applied"]]
    for panel in panels[:2]:
        assert panel.log_x and fit_names[panel.flags["baseline_no_counts"]].tolist() == [OFF_GENE]
        # no baseline count: its baseline mean is the lowest, its interval the widest
        off = panel.flags["baseline_no_counts"]
        assert panel.baseline_mean[off][0] == panel.baseline_mean.min()
        width = panel.q95 - panel.q05
        assert width[off][0] == width.max()
    for panel in panels[2:]:
        assert not panel.log_x and len(panel.mean) == 4 * K


def test_the_cis_features_effect_per_group_is_the_stored_posterior(finished) -> None:
    folder, _ = finished
    root = zarr.open_group(str(_store(folder)), mode="r")
    draws = root["technical/cis"]["alpha_x_add"][...].astype(np.float64)  # [S, C]
    [rows] = [t[1:] for t in _parsed(folder).tables if t[0] == ["group", "mean", "q05", "q95"]]
    assert [row[0] for row in rows] == [BASELINE, "HEL", "K562"]
    assert rows[0][1:] == ["+0.000"] * 3  # the baseline's own effect is fixed
    for c, row in enumerate(rows):
        expected = [draws[:, c].mean(), *np.quantile(draws[:, c], [0.05, 0.95])]
        np.testing.assert_allclose([float(v) for v in row[1:]], expected, atol=5e-4)
    assert "The cis feature GFI1B (log2)" in _page(folder).read_text()


def test_every_step_has_its_wall_time_and_peak_memory(finished) -> None:
    folder, _ = finished
    rows = _parsed(folder).table("step")
    steps = [(row[0], row[1]) for row in rows]
    expected = [("pre-flight checks", ""), ("store and cells", ""), ("technical groups", "")]
    for name in ("gene", "donor"):
        expected += [(s, name) for s in ("ingest", "NTC filters", "fit (SVI)", "posterior draws")]
    assert steps == expected
    total = psutil.virtual_memory().total / 2**20
    for row in rows:
        assert float(row[2]) >= 0.0
        # this process ran every step: torch and Prefect alone hold well over 50 MiB
        assert 50 < float(row[3].replace(",", "")) < total
        assert row[-1] == "ran"


def test_a_new_run_withdraws_the_page_until_it_finishes(
    finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(shutil.copytree(finished[0], tmp_path / "screen"))
    config = folder / "config.yaml"
    spec = yaml.safe_load(config.read_text())
    spec["fit"]["seed"] = 1  # a changed fit: the rerun fits again

    def fails(*args, **kwargs):
        raise RuntimeError("killed in the fit")

    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    with monkeypatch.context() as patch:
        patch.setattr(tasks.steps, "fit_modality", fails)
        state = technical_fit(str(config), return_state=True)
    assert state.is_failed()
    assert not _page(folder).exists()  # the old page described the store as it was
    assert COMPLETE not in zarr.open_group(str(_store(folder)), mode="r").attrs

    assert technical_fit(str(config), return_state=True).is_completed()
    rows = {(row[0], row[1]): row[-1] for row in _parsed(folder).table("step")}
    assert rows[("ingest", "gene")] == "skipped (inputs unchanged)"
    assert rows[("fit (SVI)", "gene")] == "ran"


def test_one_technical_group_has_no_effects_to_draw(tmp_path: Path) -> None:
    """No covariates: one group, `all`, the baseline of nothing: the page says so and
    draws the loss trace only."""
    config = write_demo_inputs(tmp_path / "one", n_cells=90, n_features=8, niters=40, nsamples=5)
    spec = yaml.safe_load(config.read_text())
    spec["covariates"] = []
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert technical_fit(str(config), return_state=True).is_completed()
    page = _parsed(config.parent)
    [row] = page.table("group")
    assert row[0] == "all (baseline)" and row[1] == row[3] != "0"
    assert [image["alt"] for image in page.images] == ["SVI loss of gene"]
    assert "One technical group: there are no effects to show." in _page(config.parent).read_text()


@pytest.mark.slow
def test_a_headless_browser_loads_every_figure(finished, tmp_path: Path) -> None:
    """Debian's chromium (`apt install chromium`), driven by Playwright: every figure
    decodes, and the page asks for nothing beyond its own file. Skipped where either is
    missing, except in CI (BAYESDREAM_REQUIRE_BROWSER=1), where it fails."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        if BROWSER_REQUIRED:
            pytest.fail(f"chromium ({chromium}) and playwright are required here")
        pytest.skip("needs Debian's chromium and the playwright package")
    folder, _ = finished
    uri = _page(folder).resolve().as_uri()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            requested: list[str] = []
            tab.on("request", lambda request: requested.append(request.url))
            tab.goto(uri, wait_until="load")
            images = tab.evaluate(
                "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
                " width: i.naturalWidth, shown: i.getBoundingClientRect().width}))"
            )
            heading = tab.inner_text("h1")
            tab.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    # a loss trace per modality, a figure per non-baseline group per modality
    assert len(images) == 2 * (1 + 2), images
    for image in images:
        assert image["complete"] and image["width"] > 0 and image["shown"] > 0, image
    assert [url for url in requested if not url.startswith("data:")] == [uri]
    assert heading == "bayesDREAM technical fit: run.zarr"
    assert (tmp_path / "page.png").stat().st_size > 50_000


#: as root in a container, without a sandbox; no background traffic on a closed network
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_the_cli_names_the_page_and_report_rewrites_it(
    finished, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flows.cli import main

    folder = Path(shutil.copytree(finished[0], tmp_path / "screen"))
    _page(folder).unlink()
    assert main(["report", str(_store(folder)), "--modality", "donor"]) == 0
    page = _parsed(folder)
    assert [row[1] for row in page.table("step")][-4:] == ["donor"] * 4
    assert len(page.images) == 1 + 2  # donor only: its loss trace and two groups
    assert main(["report", str(_store(folder)), "--modality", "protein"]) == 2
    assert "no finished results for ['protein']" in caplog.text
    assert "modalities with results: ['donor', 'gene']" in caplog.text
    caplog.clear()
    caplog.set_level(logging.INFO, logger="bayesdream")  # the CLI's own logger
    assert main(["run", str(folder / "config.yaml")]) == 0  # every step unchanged: skipped
    assert f"The run's page: {_page(folder).resolve().as_uri()}" in caplog.text


def test_a_page_that_cannot_be_written_is_a_warning_and_leaves_no_half_page(
    finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.orchestration.artifacts import publish_run_page

    folder = Path(shutil.copytree(finished[0], tmp_path / "screen"))
    _page(folder).unlink()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_page.os, "replace", disk_full)
    root = zarr.open_group(str(_store(folder)), mode="r")
    assert publish_run_page(root, _store(folder), ["gene"]) is None
    assert "Could not write the run page artifact (OSError" in caplog.text
    assert sorted(p.name for p in _page(folder).parent.iterdir() if "index" in p.name) == []
