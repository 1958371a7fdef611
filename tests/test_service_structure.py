"""The service layer's shape (issue 21): no import cycle, nothing below the routes imports a route,
no upward import, modules under ~400 lines and functions under ~80. Pure ``ast``: runs in a second."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(pkg: str) -> dict[str, Path]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / pkg).rglob("*.py")
    }


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (function-level and TYPE_CHECKING imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules("service")
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    # a package's __init__ naming its own modules is not a cycle of the modules themselves
    return {
        m: {i for i in deps if not (mods[m].name == "__init__.py" and i.startswith(m + "."))}
        for m, deps in graph.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n, [*stack, n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_service_has_no_import_cycle_and_no_module_below_the_routes_imports_one() -> None:
    graph = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    below = {
        m: d
        for m, deps in graph.items()
        if not m.startswith("service.api") and m != "service.main"
        for d in deps
        if d.startswith("service.api.routes")
    }
    assert not below, below
    upward = {m: sorted(i for i in _imports(p) if i.split(".")[0] == "pam_app") for m, p in _modules("service").items()}
    assert not {m: i for m, i in upward.items() if i}, upward
    for m, p in {**_modules("mobile_export"), **_modules("pam_common")}.items():
        assert not any(i.split(".")[0] in ("service", "pam_app") for i in _imports(p)), m


def test_service_modules_and_functions_stay_small() -> None:
    big = {}
    for m, p in _modules("service").items():
        text = p.read_text()
        if text.count("\n") > 400:
            big[m] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                if node.end_lineno - node.lineno + 1 > 80:
                    big[f"{m}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert not big, big
