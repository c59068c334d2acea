"""`baseline_group:` through the flow: the named group is code 0 in every step's output,
its effects are exactly the baseline's, the store and the report say so, and a changed
(not an unchanged) baseline refits.

The demo's groups are HEL, K562, TF1 (sorted); the run names TF1, which sorts last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import tasks.fit.fitting
import tasks.sample.sampling
import tasks.steps
from flows.technical_fit import technical_fit
from tasks.demo import write_demo_inputs
from tasks.orchestration.artifacts import artifact_key
from tasks.results.report import write_report
from tasks.store import CIS_KEY, COMPLETE, GROUPS, fit_key, read_strings, results_key

BASELINE = ["baseline_group=TF1"]
NAMED, FIRST_SORTED = "named by baseline_group", "first in sorted order"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A small demo run with `baseline_group: TF1`, and its Prefect artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    config = write_demo_inputs(
        tmp_path_factory.mktemp("baseline") / "demo",
        n_cells=90,
        n_features=8,
        niters=40,
        nsamples=5,
    )
    state = technical_fit(str(config), BASELINE, return_state=True)
    assert state.is_completed(), state
    run_filter = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=run_filter))
    return config.parent, {artifact.key: artifact for artifact in found}


@pytest.fixture
def config(finished: tuple[Path, dict], tmp_path: Path) -> Path:
    """This test's copy of the finished folder (inputs, config, store)."""
    return shutil.copytree(finished[0], tmp_path / "demo") / "config.yaml"


def _root(config: Path) -> zarr.Group:
    return zarr.open_group(str(config.parent / "results" / "run.zarr"), mode="r")


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran, but baseline_group did not change")

    return refuse


def test_the_named_group_is_code_0_and_holds_the_baseline(config: Path) -> None:
    root = _root(config)
    results = root[results_key("gene")]
    assert list(read_strings(root[GROUPS], "labels")) == ["TF1", "HEL", "K562"]
    assert list(read_strings(results, "group_labels")) == ["TF1", "HEL", "K562"]
    for key in (GROUPS, results_key("gene"), CIS_KEY):
        attrs = root[key].attrs
        assert attrs["baseline_group"] == "TF1" and attrs["baseline_rule"] == NAMED, key
    codes = root[GROUPS]["code"][...]
    lines = read_strings(root["inputs/cells/covariates"], "cell_line")
    assert set(lines[codes == 0]) == {"TF1"}
    add, mult = results["alpha_y_add"][...], results["alpha_y_mult"][...]
    assert (add[:, 0, :] == 0).all() and (mult[:, 0, :] == 1).all()
    fit = results["technical_correction_applied"][...]
    assert (add[:, 1:, fit] != 0).all()  # the other groups' effects are learnt
    assert (root[CIS_KEY]["alpha_x_add"][...][:, 0] == 0).all()
    assert root.attrs[COMPLETE] is True


def test_the_report_and_its_artifact_name_the_baseline(
    finished: tuple[Path, dict], config: Path
) -> None:
    store = config.parent / "results" / "run.zarr"
    markdown = write_report(_root(config), store, "gene").markdown
    row = "| baseline group (effects relative to it) | TF1 (named by baseline_group) |"
    assert row in markdown
    artifact = finished[1][
        artifact_key("report", "gene", store=finished[0] / "results" / "run.zarr")
    ]
    assert "baseline: TF1 (named by baseline_group)" in artifact.description
    assert "TF1 (named by baseline_group)" in artifact.data


def test_an_unchanged_baseline_group_skips_every_step(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("assign_groups_in_store", "filter_features", "fit_modality", "sample_modality"):
        monkeypatch.setattr(tasks.steps, name, _refuse(name))
    monkeypatch.setattr(tasks.fit.fitting, "fit_technical", _refuse("SVI"))
    monkeypatch.setattr(tasks.sample.sampling, "draw_range", _refuse("posterior sampling"))
    technical_fit(str(config), BASELINE)
    assert _root(config).attrs[COMPLETE] is True


@pytest.mark.parametrize(
    ("overrides", "labels", "rule"),
    [
        (["baseline_group=K562"], ["K562", "HEL", "TF1"], NAMED),
        ([], ["HEL", "K562", "TF1"], FIRST_SORTED),
    ],
)
def test_a_changed_baseline_group_refits(
    config: Path, overrides: list[str], labels: list[str], rule: str
) -> None:
    before = _root(config)
    loss = before[fit_key("gene")]["loss"][...]
    fingerprints = {key: before[key].attrs["fingerprint"] for key in (GROUPS, fit_key("gene"))}

    technical_fit(str(config), overrides)

    root = _root(config)
    for key, fingerprint in fingerprints.items():
        assert root[key].attrs["fingerprint"] != fingerprint, key
    results = root[results_key("gene")]
    assert list(read_strings(results, "group_labels")) == labels
    assert results.attrs["baseline_group"] == labels[0] and results.attrs["baseline_rule"] == rule
    assert root[GROUPS].attrs["baseline_rule"] == rule
    assert not np.array_equal(root[fit_key("gene")]["loss"][...], loss)  # refit
    add, fit = results["alpha_y_add"][...], results["technical_correction_applied"][...]
    assert (add[:, 0, :] == 0).all()
    assert (add[:, labels.index("TF1")][:, fit] != 0).all()  # TF1's effect is learnt now
    assert results.attrs[COMPLETE] is True and root.attrs[COMPLETE] is True
