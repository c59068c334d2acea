"""House-style boundaries: what the model package imports, and no printing anywhere."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import bayesdream_model

MODEL_DIR = Path(bayesdream_model.__file__).resolve().parent
REPO = MODEL_DIR.parent
ALLOWED_IMPORTS = {"torch", "pyro", "numpy", "bayesdream_model", "__future__"} | set(
    sys.stdlib_module_names
)
# stdlib, but the model package must not read the environment (the tasks layer passes numbers)
ENVIRONMENT_READS = {("os", "environ"), ("os", "getenv"), ("os", "environb"), ("os", "putenv")}


def python_files(*packages: str) -> list[Path]:
    files = [p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))]
    return [p for p in files if ".venv" not in p.parts and "__pycache__" not in p.parts]


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def imported_packages(tree: ast.Module) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import, at any depth in the module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


MODEL_FILES = python_files("bayesdream_model")
PRINT_FILES = [p for p in python_files("bayesdream_model", "tasks", "flows") if p.name != "cli.py"]


def test_scanned_files_exist() -> None:
    assert MODEL_DIR / "model.py" in MODEL_FILES and len(MODEL_FILES) >= 10


@pytest.mark.parametrize("path", MODEL_FILES, ids=rel)
def test_model_package_imports_only_torch_pyro_numpy_and_stdlib(path: Path) -> None:
    bad = sorted(
        (name, line) for name, line in imported_packages(parse(path)) if name not in ALLOWED_IMPORTS
    )
    assert not bad, f"{rel(path)} imports {bad}: only torch, pyro, numpy and the stdlib are allowed"


@pytest.mark.parametrize("path", MODEL_FILES, ids=rel)
def test_model_package_does_not_read_the_environment(path: Path) -> None:
    reads = [
        (f"{node.value.id}.{node.attr}", node.lineno)
        for node in ast.walk(parse(path))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and (node.value.id, node.attr) in ENVIRONMENT_READS
    ]
    assert not reads, f"{rel(path)} reads the environment: {reads}"


@pytest.mark.parametrize("path", PRINT_FILES, ids=rel)
def test_no_print_calls(path: Path) -> None:
    calls = [
        node.lineno
        for node in ast.walk(parse(path))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    assert not calls, f"{rel(path)} calls print() on lines {calls}: log instead"


def test_the_scan_catches_what_it_should() -> None:
    tree = ast.parse(
        "import zarr.storage\nfrom prefect import flow\nfrom . import sibling\n"
        "def f():\n    import pandas as pd\n    print('x')\n"
    )
    names = {name for name, _ in imported_packages(tree)}
    assert names == {"zarr", "prefect", "pandas"}
    assert not names <= ALLOWED_IMPORTS
    assert {"os", "math", "logging", "dataclasses"} <= ALLOWED_IMPORTS
