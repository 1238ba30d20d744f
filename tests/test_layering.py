"""The house rules of docs/design.md, checked on the import graph (read from the source with `ast`).

Data flows one way and each floor imports only the floors below it; these are the rules a
refactor most easily breaks without any test failing, so they are tests of their own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hwnas", "exporters", "benchmarks")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the library, the exporters and the benchmarks."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (at the top or inside a function), as dotted names."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("hwnas", "exporters")}


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _importers(target: str) -> list[str]:
    return sorted(m for m, imported in IMPORTS.items() if target in imported)


def test_nothing_but_the_cli_imports_the_commands() -> None:
    offenders = [m for m, imported in IMPORTS.items() if not (m.startswith("hwnas.commands") or m == "hwnas.cli")
                 and any(i == "hwnas.commands" or i.startswith("hwnas.commands.") for i in imported)]
    assert not offenders, offenders


def test_training_is_imported_only_from_the_top_floor() -> None:
    allowed = re.compile(r"^(hwnas\.commands\..*|hwnas\.demo|hwnas\.train_pipeline|benchmarks\..*)$")
    assert [m for m in _importers("hwnas.train") if not allowed.match(m)] == []


def test_searchers_know_protocols_not_the_latency_package() -> None:
    """Only the search pipeline (which puts real parts behind the protocols) may reach into hwnas.latency."""
    searchers = [m for m in IMPORTS if m.startswith("hwnas.search") and m != "hwnas.search.pipeline"]
    offenders = {m: sorted(i for i in IMPORTS[m] if i.startswith("hwnas.latency")) for m in searchers}
    assert {m: v for m, v in offenders.items() if v} == {}


@pytest.mark.parametrize("lower", ["hwnas.evaluation", "hwnas.space", "hwnas.arch", "hwnas.genes", "hwnas.runrecord",
                                   "hwnas.latency.table", "hwnas.latency.backends"])
def test_lower_floors_import_no_pipeline(lower: str) -> None:
    pipelines = ("hwnas.search.pipeline", "hwnas.export_pipeline", "hwnas.demo", "hwnas.train_pipeline",
                 "hwnas.deploy", "hwnas.train")
    assert not [i for i in IMPORTS[lower] if i.startswith(pipelines)]


def test_exporters_import_down_only() -> None:
    """exporters/ sits beside hwnas at the top level but below its pipelines: errors, files, the space."""
    allowed = ("hwnas.errors", "hwnas.fileio", "hwnas.space", "hwnas.arch", "exporters")
    for module in (m for m in IMPORTS if m.startswith("exporters")):
        assert [i for i in IMPORTS[module] if not i.startswith(allowed)] == [], module


def test_no_import_cycle_among_the_top_level_imports() -> None:
    """Module-level imports only (a function-level import is how a cycle is broken on purpose)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in MODULES and d != name}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_modules_stay_small_unless_the_design_notes_say_why() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    unexplained = [f for f in long if f"`{f}`" not in design.split("## Modules over", 1)[-1]]
    assert unexplained == [], f"over {MAX_LINES} lines without a reason in docs/design.md: {long}"


def test_the_design_map_names_every_module() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    missing = [str(p.relative_to(ROOT)) for name, p in MODULES.items()
               if name.startswith(("hwnas", "exporters")) and f"`{p.relative_to(ROOT)}`" not in design]
    assert missing == [], f"docs/design.md does not name: {missing}"
