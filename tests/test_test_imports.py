"""What the tests import is declared: `pip install -e .[test]` gives every test what it
needs, so that none is skipped, or passes, for a package that happens to be missing."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"bayesdream_model", "tasks", "flows", "benchmarks", "deployments"}


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports (`import x`, `from x import`,
    `pytest.importorskip("x")`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return {name.split(".")[0] for name in names}


def _declared() -> set[str]:
    """Distribution names (normalised) of the dependencies and the `test` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    return {_normalised(re.split(r"[<>=!~\[; ]", item, maxsplit=1)[0]) for item in requirements}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_package_the_tests_import_is_declared() -> None:
    tests = ROOT / "tests"
    local = {path.stem for path in tests.rglob("*.py")}
    third_party = {
        module
        for path in tests.rglob("*.py")
        for module in _imported_modules(path)
        if module not in sys.stdlib_module_names | PROJECT_PACKAGES | local
    }
    assert "mpmath" in third_party  # the scan sees what the tests import
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = {
        module: providers.get(module, ["(not installed)"])
        for module in sorted(third_party)
        if not {_normalised(d) for d in providers.get(module, [])} & declared
    }
    assert undeclared == {}, "add these to [project.optional-dependencies] test"
