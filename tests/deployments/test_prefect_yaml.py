"""deployments/prefect.yaml checked offline with Prefect's own models, and `bayesdream deploy`."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ParameterTypeError
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import PROJECT_ROOT, main

PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
POOL = "bayesdream-process"
SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The raw file, as `prefect deploy` reads it."""
    return yaml.safe_load(PREFECT_FILE.read_text())


@pytest.fixture(scope="module")
def deployments(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in spec["deployments"]}


@pytest.fixture(scope="module")
def flows(deployments: dict[str, dict[str, Any]]) -> dict[str, Flow]:
    """Each deployment's entrypoint loaded the way the deploy and the worker load it."""
    loaded: dict[str, Flow] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(PROJECT_ROOT)  # entrypoints are relative to the project root
        for name, item in deployments.items():
            loaded[name] = load_flow_from_entrypoint(item["entrypoint"])
    return loaded


def test_file_validates_with_prefects_model(spec: dict[str, Any]) -> None:
    # The model `prefect deploy` validates with (a private module: skip, not fail, if it moves).
    models = pytest.importorskip("prefect.cli.deploy._models")
    model = models.PrefectYamlModel.model_validate(spec)
    assert {item.name for item in model.deployments} >= {"on-demand", "nightly"}
    for item in model.deployments:
        assert item.entrypoint == "flows/technical_fit.py:technical_fit"
        assert item.work_pool is not None and item.work_pool.name == POOL
        for schedule in item.schedules or []:
            assert isinstance(schedule, models.RawScheduleConfig), schedule


def test_entrypoints_load_the_technical_fit_flow(flows: dict[str, Flow]) -> None:
    assert {flow.name for flow in flows.values()} == {"technical-fit"}


def test_declared_parameters_validate(
    deployments: dict[str, dict[str, Any]], flows: dict[str, Flow]
) -> None:
    nightly = flows["nightly"].validate_parameters(deployments["nightly"]["parameters"])
    assert nightly["config"] == "/data/screen/config.yaml"
    assert nightly["overrides"] == []
    declared = deployments["on-demand"]["parameters"]
    run = flows["on-demand"].validate_parameters(declared | {"config": "/x/config.yaml"})
    assert run["config"] == "/x/config.yaml"


def test_on_demand_needs_a_config_per_run(
    deployments: dict[str, dict[str, Any]], flows: dict[str, Flow]
) -> None:
    """No default config: a run that names none is refused, not run on a stale screen."""
    assert "config" not in deployments["on-demand"]["parameters"]
    with pytest.raises(ParameterTypeError, match="config"):
        flows["on-demand"].validate_parameters(deployments["on-demand"]["parameters"])
    assert deployments["on-demand"]["enforce_parameter_schema"] is True


def test_nightly_has_a_valid_cron_schedule(deployments: dict[str, dict[str, Any]]) -> None:
    (raw,) = deployments["nightly"]["schedules"]
    schedule = CronSchedule(cron=raw["cron"], timezone=raw["timezone"])  # validates both
    assert schedule.cron == "0 2 * * *"
    assert zoneinfo.ZoneInfo(schedule.timezone) is not None
    assert raw.get("active", True) is True
    assert "schedules" not in deployments["on-demand"]
    assert deployments["nightly"]["concurrency_limit"]["limit"] == 1


def test_cron_is_rejected_when_malformed() -> None:
    """The check above has teeth: Prefect's model refuses a cron with four fields."""
    with pytest.raises(ValueError, match="cron"):
        CronSchedule(cron="0 2 * *", timezone="UTC")


def test_pull_step_returns_to_the_project_root(spec: dict[str, Any]) -> None:
    """The build step records the deploying cwd; the pull step's directory resolves to it.

    The step function is called directly: Prefect's `run_steps` would also resolve blocks
    and variables, which needs an API (a temporary server, ~15 s).
    """
    from prefect.deployments.steps import run_shell_script
    from prefect.utilities.templating import apply_values

    (build,) = spec["build"]
    ((step, inputs),) = build.items()
    assert step == "prefect.deployments.steps.run_shell_script"
    inputs = dict(inputs)
    step_id = inputs.pop("id")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(PROJECT_ROOT)  # where `bayesdream deploy` runs Prefect's deploy
        output = asyncio.run(run_shell_script(**inputs))
    (pull,) = apply_values(spec["pull"], {step_id: output})
    assert list(pull) == [SET_WORKING_DIRECTORY]
    assert Path(pull[SET_WORKING_DIRECTORY]["directory"]) == PROJECT_ROOT
    assert (PROJECT_ROOT / "flows" / "technical_fit.py").is_file()


# --- `bayesdream deploy` (the subprocess is replaced; the e2e test runs it for real) ----


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    recorded: list[dict[str, Any]] = []

    def fake_run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        recorded.append({"command": command, **kwargs})
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr("flows.cli.subprocess.run", fake_run)
    return recorded


def test_cli_deploy_runs_prefect_deploy_from_the_project_root(calls: list) -> None:
    url = "http://127.0.0.1:4999/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert main(["deploy", str(PREFECT_FILE)]) == 0
        assert main(["deploy", str(PREFECT_FILE), "--name", "technical-fit/nightly"]) == 0
    every, named = calls
    assert every["command"][1:] == [
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(PREFECT_FILE),
        "--all",
    ]
    assert named["command"][-2:] == ["--name", "technical-fit/nightly"]
    assert "--all" not in named["command"]
    for call in calls:
        assert Path(call["command"][0]).name == "prefect"
        assert call["cwd"] == PROJECT_ROOT
        assert call["env"]["PREFECT_API_URL"] == url


def test_cli_deploy_refuses_without_an_api_url(
    calls: list, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), caplog.at_level(logging.ERROR):
        assert main(["deploy", str(PREFECT_FILE)]) == 2
    assert "PREFECT_API_URL is not set" in caplog.text
    assert "prefect server start" in caplog.text
    assert calls == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "technical-fit/weekly"], "--name 'technical-fit/weekly' matches no deployment"),
        (["--name", "nightly", "--name", "hourly"], "--name 'hourly' matches no deployment"),
    ],
)
def test_cli_deploy_names_unknown_deployments(
    calls: list, caplog: pytest.LogCaptureFixture, args: list[str], message: str
) -> None:
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4999/api"}):
        assert main(["deploy", str(PREFECT_FILE), *args]) == 2
    assert message in caplog.text
    assert "['nightly', 'on-demand']" in caplog.text
    assert calls == []


def test_cli_deploy_reports_a_missing_file(
    calls: list, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    missing = tmp_path / "prefect.yaml"
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4999/api"}):
        assert main(["deploy", str(missing)]) == 2
    assert f"Cannot read the Prefect deployment file '{missing}'" in caplog.text
    assert calls == []
