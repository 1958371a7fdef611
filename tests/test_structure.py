"""The project's shape (issue 21): the layers import only downward (pam_common <- merging <- mobile_export
<- service <- pam_app), no package has an import cycle, nothing in the service below the routes imports a
route, modules stay under ~400 lines and functions under ~80. Pure ``ast``: runs in a second."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _modules(pkg: str) -> dict[str, Path]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / pkg).rglob("*.py")
    }


def _imports(path: Path, type_only: bool = True) -> set[str]:
    """Every module imported anywhere in the file (function-level imports too; ``if TYPE_CHECKING:``
    imports unless ``type_only`` is False: a type-only back-reference is not a cycle at run time)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if not type_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


LAYERS = ("pam_common", "merging", "mobile_export", "service", "pam_app")  # each may import only those before it


def _graph(pkg: str = "service") -> dict[str, set[str]]:
    mods = _modules(pkg)
    graph = {m: {i for i in _imports(p, type_only=False) if i in mods and i != m} for m, p in mods.items()}
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


def _facts() -> dict[str, Any]:
    """Everything the tests assert, computed from the sources."""
    service = _graph("service")
    below = sorted(
        f"{m} -> {d}"
        for m, deps in service.items()
        if not m.startswith("service.api") and m != "service.main"
        for d in deps
        if d.startswith("service.api.routes")
    )
    upward: dict[str, list[str]] = {}
    cycles: dict[str, list[str] | None] = {}
    for k, pkg in enumerate(LAYERS):
        above = set(LAYERS[k + 1 :])
        for m, p in _modules(pkg).items():
            bad = sorted(i for i in _imports(p) if i.split(".")[0] in above)
            if bad:
                upward[m] = bad
        cycles[pkg] = _cycle(_graph(pkg))
    big: dict[str, int] = {}
    for m, p in {k: v for pkg in LAYERS for k, v in _modules(pkg).items()}.items():
        text = p.read_text()
        if text.count("\n") > 400:
            big[m] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                if node.end_lineno - node.lineno + 1 > 80:
                    big[f"{m}.{node.name}"] = node.end_lineno - node.lineno + 1
    verify_imports_export = "mobile_export.export" in _graph("mobile_export")["mobile_export.verify"]
    return {
        "below": below,
        "upward": upward,
        "cycles": cycles,
        "big": big,
        "verify_imports_export": verify_imports_export,
    }


@functools.lru_cache(maxsize=1)
def _facts_in_child() -> dict[str, Any]:
    # In a fresh interpreter: after other tests change the recursion limit (hypothesis does), CPython
    # 3.11's ast.parse can fail with "AST constructor recursion depth mismatch".
    code = "import json, tests.test_structure as t; print(json.dumps(t._facts()))"
    # A generous timeout: on a loaded machine the child can wait minutes for a core.
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_service_has_no_import_cycle_and_no_module_below_the_routes_imports_one() -> None:
    facts = _facts_in_child()
    assert facts["cycles"]["service"] is None, facts["cycles"]["service"]
    assert not facts["below"], facts["below"]


def test_every_layer_imports_only_the_layers_below_it_and_has_no_cycle() -> None:
    facts = _facts_in_child()
    assert not {k: v for k, v in facts["cycles"].items() if v}, facts["cycles"]
    assert not facts["upward"], facts["upward"]
    assert not facts["verify_imports_export"]  # verify checks exports; it must not import the exporter


def test_modules_and_functions_stay_small() -> None:
    facts = _facts_in_child()
    assert not facts["big"], facts["big"]
