"""The project's modules import one another without circles, function-level imports
included (a circle held apart by an import inside a function still ties both modules
together), and `tasks/` keeps Prefect to its orchestration layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bayesdream_model", "tasks", "flows")
#: the modules that may import Prefect: the step wrappers and the orchestration helpers
#: (artifacts, run logging), and the lock's record of the flow run holding a store
PREFECT_ALLOWED = ("tasks.steps", "tasks.orchestration.", "tasks.lock", "flows.")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path] | None = None) -> set[str]:
    """Every module named in an import statement anywhere in the file; `from package
    import submodule` names the submodule (not the package) when it is one of `known`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names}
            inside = {m for m in subs if known is not None and m in known}
            found |= inside if inside == subs else {node.module, *inside}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {m for m in imports_of(path, known) if m in known and m != name}
        for name, path in known.items()
    }


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circles() -> None:
    assert cycle(graph()) is None, " -> ".join(cycle(graph()) or [])


def test_the_circle_check_finds_a_circle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_prefect_only_in_the_orchestration_layer() -> None:
    users = {
        name
        for name, path in modules().items()
        if any(m == "prefect" or m.startswith("prefect.") for m in imports_of(path))
    }
    assert users, "no module imports Prefect: the check looks in the wrong place"
    strays = sorted(u for u in users if not u.startswith(PREFECT_ALLOWED) and u != "tasks.steps")
    assert not strays, strays
