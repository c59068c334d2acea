"""Reruns of the flow on an existing store redo exactly the steps whose inputs changed.

One finished store is made per module; each test reruns the flow on a copy of its folder
(inputs, config and store: fingerprints hash file contents, not paths) and counts, with
spies on the functions the steps call, which steps did their work again.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import tasks.fit.fitting
import tasks.sample.sampling
import tasks.steps
from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.store import CELLS, CIS_KEY, COMPLETE, GROUPS, fit_key, inputs_key, prep_key, results_key

NSAMPLES = 20
# What each step calls to do its work (looked up in tasks.steps when the step runs).
WORK = {
    "cells": "write_cells",
    "groups": "assign_groups_in_store",
    "ingest": "ingest_modality",
    "filter": "filter_features",
    "fit": "fit_modality",
    "sample": "sample_modality",
}
# The store groups each step writes.
WRITES = {
    "cells": [CELLS],
    "groups": [GROUPS],
    "ingest": [inputs_key("gene")],
    "filter": [prep_key("gene")],
    "fit": [fit_key("gene")],
    "sample": [results_key("gene"), CIS_KEY],
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo folder (250 cells x 16 features) whose store holds a finished run."""
    config = write_demo_inputs(
        tmp_path_factory.mktemp("rerun") / "demo",
        n_cells=250,
        n_features=16,
        niters=100,
        nsamples=NSAMPLES,
    )
    technical_fit(str(config))
    return config.parent


@pytest.fixture
def config(finished: Path, tmp_path: Path) -> Path:
    """This test's copy of the finished folder; returns its config path."""
    return shutil.copytree(finished, tmp_path / "demo") / "config.yaml"


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Calls of each step's work function during the test."""
    calls: Counter = Counter()
    for step, name in WORK.items():
        original = getattr(tasks.steps, name)

        def spy(*args, _original=original, _step=step, **kwargs):
            calls[_step] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(tasks.steps, name, spy)
    return calls


@pytest.fixture
def task_messages() -> Iterator[list[str]]:
    """The messages the flow's tasks log (Prefect's task-run logger)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Collect(logging.INFO), logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def _store(config: Path) -> Path:
    return config.parent / "results" / "run.zarr"


def _files(store: Path, key: str) -> dict[str, tuple[int, bytes]]:
    """Every file of a store group (metadata and chunks) with its mtime and bytes."""
    return {
        str(path.relative_to(store)): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted((store / key).rglob("*"))
        if path.is_file()
    }


def _snapshot(store: Path) -> dict[str, dict[str, tuple[int, bytes]]]:
    """The files of the groups each step writes, by step."""
    return {
        step: {f: v for key in keys for f, v in _files(store, key).items()}
        for step, keys in WRITES.items()
    }


def _assert_complete(store: Path) -> zarr.Group:
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs[COMPLETE] is True
    for key in (results_key("gene"), CIS_KEY):
        assert root[key].attrs[COMPLETE] is True, key
    return root


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran, but nothing it depends on changed")

    return refuse


def test_unchanged_rerun_skips_every_step(
    config: Path, work: Counter, task_messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(config)
    before = _snapshot(store)
    monkeypatch.setattr(tasks.fit.fitting, "fit_technical", _refuse("SVI"))
    monkeypatch.setattr(tasks.sample.sampling, "draw_range", _refuse("posterior sampling"))

    technical_fit(str(config))

    assert sum(work.values()) == 0, work
    assert _snapshot(store) == before  # not one file of any step rewritten, or touched
    for logged in (
        "Cells table unchanged",
        "Modality 'gene': input files unchanged, ingestion skipped",
        "Modality 'gene': filters unchanged, skipped",
        "Modality 'gene': fit inputs unchanged, fit skipped",
        "Modality 'gene': results unchanged, sampling skipped",
    ):
        assert any(m.startswith(logged) for m in task_messages), logged
    root = _assert_complete(store)
    # the first run's fit, kept: its steps as the store recorded them
    assert root.attrs["steps"]["gene"]["fit"]["niters_run"] == root["fit/gene"].attrs["niters_run"]


def _first_ntc_cell(config: Path) -> str:
    """A cell that the fit reads (the fit is on the NTC cells)."""
    cells = pd.read_csv(config.parent / "cells.csv")
    return str(cells.loc[cells["target"] == "ntc", "cell"].iloc[0])


def _edit_counts(config: Path) -> None:
    """One count of one fit feature (not a target gene, not a planted one) plus one."""
    path, cell = config.parent / "gene_counts.csv", _first_ntc_cell(config)
    counts = pd.read_csv(path, index_col=0)
    counts.loc[counts.index[6], cell] += 1
    counts.to_csv(path)


def _edit_cells(config: Path) -> None:
    """One NTC cell's size factor changes (every cell, group and feature is kept)."""
    path, cell = config.parent / "cells.csv", _first_ntc_cell(config)
    cells = pd.read_csv(path)
    cells.loc[cells["cell"] == cell, "sum_factor"] *= 1.25
    cells.to_csv(path, index=False)


# change -> (overrides, file edit, the steps that must run again)
CHANGES = {
    "checkpoint_seconds": (["fit.checkpoint_seconds=5", "fit.threads=2"], None, set()),
    "nsamples": (["fit.nsamples=30"], None, {"sample"}),
    "lr": (["fit.lr=0.002"], None, {"fit", "sample"}),
    # TF1 sorts last of HEL, K562, TF1: a new code 0 for every later step
    "baseline_group": (["baseline_group=TF1"], None, {"groups", "filter", "fit", "sample"}),
    "counts": ([], _edit_counts, {"ingest", "filter", "fit", "sample"}),
    "cells": ([], _edit_cells, set(WORK)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_reruns_only_the_steps_downstream_of_it(
    config: Path, work: Counter, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides, edit, rerun = CHANGES[change]
    store = _store(config)
    before = _snapshot(store)
    loss = zarr.open_group(str(store), mode="r")[fit_key("gene")]["loss"][...]
    if edit is not None:
        edit(config)
    if "fit" not in rerun:
        monkeypatch.setattr(tasks.fit.fitting, "fit_technical", _refuse("SVI"))

    technical_fit(str(config), overrides)

    assert work == Counter(dict.fromkeys(rerun, 1))
    after = _snapshot(store)
    for step in WORK:  # the groups of skipped steps are untouched, the others rewritten
        assert (after[step] == before[step]) == (step not in rerun), step
    root = _assert_complete(store)
    nsamples = 30 if change == "nsamples" else NSAMPLES
    assert root[results_key("gene")]["alpha_y"].shape[0] == nsamples
    assert root[CIS_KEY]["alpha_x"].shape[0] == nsamples
    new_loss = root[fit_key("gene")]["loss"][...]
    assert np.array_equal(new_loss, loss) == ("fit" not in rerun), change
    np.testing.assert_array_equal(root[results_key("gene")]["loss"][...], new_loss)
    baseline = "TF1" if change == "baseline_group" else "HEL"
    assert root[results_key("gene")].attrs["baseline_group"] == baseline
