"""The project explains its own model, and declares what its tests import."""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path

from tasks.config import FitConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL_DOC = ROOT / "docs" / "model.md"


def _project_text_files():
    for folder in ("bayesdream_model", "tasks", "flows", "deployments", "benchmarks", "tests"):
        yield from (ROOT / folder).rglob("*.py")
    yield from (ROOT / "deployments").rglob("*.yaml")
    yield ROOT / "README.md"
    yield from (ROOT / "docs").rglob("*.md")


def test_no_reference_to_a_document_users_do_not_have() -> None:
    """The model is docs/model.md: nothing points at a specification users do not have."""
    word = "SP" + "EC"  # spelt in two, so that this file does not match itself
    pattern = re.compile(rf"(?<![A-Z_]){word}(?![A-Z_])")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _project_text_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_model_doc_covers_the_options_that_change_the_model() -> None:
    text = MODEL_DOC.read_text()
    for heading in (
        "Data",
        "Technical groups",
        "Feature filters",
        "Priors",
        "Likelihoods",
        "Guides",
        "stop rule",
        "Posterior sampling",
        "Results",
        "Bad input",
    ):
        assert heading in text, heading
    for option in (
        "guide",
        "convergence",
        "init",
        "negbinom_baseline_prior",
        "multinomial_baseline_prior",
    ):
        for choice in typing.get_args(FitConfig.model_fields[option].annotation):
            assert f"`{choice}`" in text or f"{option}: {choice}" in text, choice
    readme = (ROOT / "README.md").read_text()
    assert "docs/model.md" in readme and "the reference bayesDREAM's choice" in readme


def test_test_extra_declares_what_the_tests_import() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in project["dependencies"]}
    declared |= {
        re.split(r"[<>=!\[ ]", d)[0].lower() for d in project["optional-dependencies"]["test"]
    }
    for package in ("anndata", "mudata", "xarray", "arviz", "pyarrow", "h5py", "pytest"):
        assert package in declared, package
