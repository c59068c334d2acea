"""Prefect artifacts of a run (progress, excluded features, report) and their no-op mode."""

from __future__ import annotations

import base64
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import zarr

# Set before Prefect's settings are read: no telemetry ("database is locked" tracebacks).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from tasks.demo import write_demo_inputs  # noqa: E402
from tasks.orchestration.artifacts import (  # noqa: E402
    Progress,
    artifact_key,
    in_run,
    publish_exclusions,
    publish_reports,
    store_slug,
)
from tasks.results.report import reports_folder  # noqa: E402

MODALITY = "gene"  # the demo's one modality
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@dataclass(frozen=True)
class DemoRun:
    """A finished demo flow run and the artifacts it left, by key."""

    config: Path
    store: Path
    artifacts: dict


@pytest.fixture(scope="module")
def demo_run(prefect_api, tmp_path_factory) -> DemoRun:
    """The demo screen through the flow, then every artifact of that flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.technical_fit import technical_fit

    config = write_demo_inputs(
        tmp_path_factory.mktemp("artifacts"), n_cells=200, n_features=20, niters=100, nsamples=20
    )
    state = technical_fit(str(config), return_state=True)
    assert state.is_completed(), state
    run_filter = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=run_filter))
    artifacts = {artifact.key: artifact for artifact in found}
    assert len(artifacts) == len(found), [artifact.key for artifact in found]
    return DemoRun(config, config.parent / "results" / "run.zarr", artifacts)


@pytest.mark.parametrize("kind", ["fit-progress", "sample-progress"])
def test_progress_artifacts_reach_100(demo_run: DemoRun, kind: str) -> None:
    artifact = demo_run.artifacts[artifact_key(kind, MODALITY, store=demo_run.store)]
    assert artifact.type == "progress"
    assert float(artifact.data) == 100.0


def test_exclusion_table_lists_the_planted_features(demo_run: DemoRun) -> None:
    truth = np.load(demo_run.config.parent / "truth.npz")
    artifact = demo_run.artifacts[artifact_key("excluded-features", MODALITY, store=demo_run.store)]
    assert artifact.type == "table"
    table = json.loads(artifact.data)
    rows = {
        feature: {reason: table[reason][i] for reason in table if reason != "feature"}
        for i, feature in enumerate(table["feature"])
    }
    assert set(rows) == {str(truth["zero_feature"]), str(truth["constant_feature"])}
    assert rows[str(truth["zero_feature"])]["ntc_zero_count"] is True
    assert rows[str(truth["constant_feature"])]["ntc_zero_std"] is True
    assert rows[str(truth["constant_feature"])]["ntc_zero_count"] is False
    assert "2 of 20 features excluded" in artifact.description


def test_report_embeds_the_plots_and_the_summary(demo_run: DemoRun) -> None:
    artifact = demo_run.artifacts[artifact_key("report", MODALITY, store=demo_run.store)]
    assert artifact.type == "markdown"
    markdown = artifact.data
    assert "data:image/png;base64," in markdown
    images = DATA_URI.findall(markdown)
    assert len(images) == 2
    assert all(base64.b64decode(image).startswith(PNG_SIGNATURE) for image in images)
    for label in (
        "SVI steps",
        "stop reason",
        "fit seconds",
        "sampling seconds",
        "features fit",
        "features excluded",
    ):
        assert f"| {label} |" in markdown
    assert "| features fit | 18 of 20 in the matrix |" in markdown


def test_report_pngs_lie_beside_the_store_so_zarr_stays_quiet(demo_run: DemoRun) -> None:
    folder = reports_folder(demo_run.store)
    assert folder == demo_run.store.with_name("run.zarr.reports")
    for kind in ("loss", "effects"):
        assert (folder / f"{MODALITY}-{kind}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (demo_run.store / "reports").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a foreign folder in the store would warn here
        keys = [
            key for key, _ in zarr.open_group(str(demo_run.store), mode="r").members(max_depth=None)
        ]
    assert f"technical/{MODALITY}" in keys


def test_artifact_helpers_are_no_ops_outside_a_run(
    demo_run: DemoRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefect.artifacts

    def refuse(*args, **kwargs):
        raise AssertionError("no artifact may be written outside a Prefect run")

    for name in (
        "create_progress_artifact",
        "update_progress_artifact",
        "create_table_artifact",
        "create_markdown_artifact",
    ):
        monkeypatch.setattr(prefect.artifacts, name, refuse)
    assert not in_run()
    progress = Progress("fit-progress-test", "test", unit="step")
    for step in range(1, 11):
        progress.update(step, 10)
    progress.finish()
    root = zarr.open_group(str(demo_run.store), mode="r")
    publish_exclusions(root, MODALITY)
    assert publish_reports(root, demo_run.store, [MODALITY]) == []


class _Recorder:
    """Stands in for Prefect's progress-artifact functions."""

    def __init__(self, *, fail: bool = False) -> None:
        self.sent: list[float] = []
        self.fail = fail

    def create(self, progress, key=None, description=None):
        return uuid4()

    def update(self, artifact_id, progress, description=None, client=None):
        if self.fail:
            raise RuntimeError("API unreachable")
        self.sent.append(progress)
        return artifact_id


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """Progress behaves as in a run, its artifact calls recorded instead of sent."""
    import prefect.artifacts

    recorder = _Recorder()
    monkeypatch.setattr("tasks.orchestration.artifacts.in_run", lambda: True)
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", recorder.create)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", recorder.update)
    return recorder


def test_progress_updates_are_throttled_by_percent(recorder: _Recorder) -> None:
    progress = Progress("fit-progress-test", "test")
    progress.MIN_SECONDS = 0.0  # only the 1 % rule applies
    for step in range(1, 10_001):
        progress.update(step, 10_000)
    progress.finish()
    assert len(recorder.sent) == 100
    assert recorder.sent[-1] == 100.0
    assert np.all(np.diff(recorder.sent) >= Progress.MIN_PERCENT)


def test_progress_updates_are_throttled_by_time_and_finish_at_100(recorder: _Recorder) -> None:
    progress = Progress("fit-progress-test", "test")
    for step in range(1, 501):  # far quicker than MIN_SECONDS
        progress.update(step, 1000)
    assert recorder.sent == []
    progress.finish()  # e.g. converged at step 500 of 1000
    assert recorder.sent == [100.0]


def test_a_failing_artifact_api_warns_once_and_the_loop_goes_on(
    recorder: _Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    recorder.fail = True
    progress = Progress("fit-progress-test", "test")
    progress.MIN_SECONDS = 0.0
    for step in range(1, 101):
        progress.update(step, 100)
    progress.finish()
    warnings_logged = [r for r in caplog.records if "Could not write" in r.getMessage()]
    assert len(warnings_logged) == 1
    assert "API unreachable" in warnings_logged[0].getMessage()


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("fit-progress", "gene", "fit-progress-gene-"),
        ("report", "ATAC_peaks v2", "report-atac-peaks-v2-"),
        ("sample-progress", "--Splice.Junctions--", "sample-progress-splice-junctions-"),
    ],
)
def test_artifact_keys_use_only_what_prefect_accepts(kind: str, name: str, expected: str) -> None:
    store = "/data/Screen A/results/run.zarr"
    key = artifact_key(kind, name, store=store)
    assert key == expected + store_slug(store)
    assert re.fullmatch(r"[a-z0-9-]+", key)
    assert re.fullmatch(r"screen-a-results-run-[0-9a-f]{8}", store_slug(store))


def test_artifact_keys_tell_stores_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same modality, stores of the same name in two folders: two keys (Prefect shows the
    latest artifact of a key as its latest, whichever run wrote it)."""
    first, second = tmp_path / "a" / "results" / "run.zarr", tmp_path / "b" / "results" / "run.zarr"
    assert artifact_key("report", "gene", store=first) != artifact_key(
        "report", "gene", store=second
    )
    # the same store, however it is given: a path, its text, relative, or the open group
    group = zarr.open_group(str(first), mode="w")
    monkeypatch.chdir(tmp_path)
    keys = {
        artifact_key("report", "gene", store=store)
        for store in (first, str(first), Path("a/results/run.zarr"), group)
    }
    assert len(keys) == 1
    long = tmp_path / ("x" * 80) / "run.zarr"
    assert len(store_slug(long)) <= 24 + 1 + 8  # readable tail, dash, hash
