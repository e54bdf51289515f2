"""The code's layering, read statically from every import statement (function-level ones too):
a role never imports another role, shared/ imports no role, and no module imports itself round a
circle (issue 16)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("broker", "trunk_worker", "silo_agent")
PACKAGES = (*ROLES, "shared", "splitfed")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import mod`
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _package(module: str) -> str:
    return module.split(".")[0]


def test_no_role_imports_another_and_shared_imports_no_role():
    bad = [(m, dep) for m, deps in _imports().items() for dep in deps
           if (_package(m) in ROLES and _package(dep) in ROLES and _package(dep) != _package(m))
           or (_package(m) == "shared" and _package(dep) in (*ROLES, "splitfed"))]
    assert bad == []


def test_no_import_circles():
    graph = _imports()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:  # depth-first; a grey node met again closes a circle
        state[module] = "grey"
        for dep in sorted(graph[module]):
            if state.get(dep) == "grey":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "black"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
