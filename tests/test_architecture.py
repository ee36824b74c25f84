"""The architecture, held in place by reading the source (docs/ARCHITECTURE.md, "How the tree is kept in shape").

Every ``import`` counts: module level, function-local and under ``TYPE_CHECKING``. Dynamic imports by string
(the pass registry's plug-in discovery) are not imports of a module the code depends on, and are not counted.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# passes/ installs as lepton_cli.passes (pyproject.toml), so its modules are named as installed.
ROOTS = {"lepton_cli": REPO / "lepton_cli", "lepton_cli.passes": REPO / "passes"}

# The layers, bottom to top: a module may import layers of its own rank or below.
RANKS = {
    "errors": 0,
    "console": 0,
    "host": 1,  # facts about this machine: what the device runtime and the compiler both ask
    "model": 2,
    "samples": 3,
    "evaluate": 4,
    "pipeline": 5,
    "passes": 6,
    "device_artifacts": 7,
    "compile": 8,
    "build": 9,
    "commands": 10,
    "cli": 10,
    "__main__": 10,
    "package": 10,  # lepton_cli/__init__.py: the library's facade (lazy re-exports)
}
# Beside the stack: each imports only these layers (and itself); any layer above model may import it.
SIDE = {"bundle": {"errors", "model"}, "runtime": {"errors", "console", "host", "model", "bundle"}}
SIDE_USERS_FROM = RANKS["samples"]
METADATA = {"__version__"}  # `from lepton_cli import __version__` reads a constant, not the facade

MAX_ENTRY_LINES = 200
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    target: str  # the imported module of the tree
    names: frozenset[str]  # `from MODULE import a, b`: the names taken from it (empty when a module is imported)
    path: Path
    line: int


def _where(edge: Edge, base: Path) -> str:
    return f"{edge.path.relative_to(base)}:{edge.line}"


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Module name -> file, for every .py under each root (package __init__ named as the package)."""
    files = {}
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def _resolve(node: ast.Import | ast.ImportFrom, module: str, path: Path, known: dict[str, Path]) -> list[tuple]:
    """(imported module of the tree, names taken) for one import statement; imports outside the tree are dropped."""
    if isinstance(node, ast.Import):
        wanted = [(alias.name, frozenset()) for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        wanted = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            wanted.append((submodule, frozenset()) if submodule in known else (base, frozenset({alias.name})))
    found = []
    for name, names in wanted:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.append((name, names))
    return found


def import_edges(roots: dict[str, Path]) -> tuple[dict[str, Path], list[Edge]]:
    files = module_files(roots)
    edges = []
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in _resolve(node, module, path, files):
                    if target != module:
                        edges.append(Edge(module, target, names, path, node.lineno))
    return files, edges


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def layer_violations(edges: list[Edge], base: Path) -> list[str]:
    found = []
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if source == target or (target == "package" and edge.names and edge.names <= METADATA):
            continue
        if source in SIDE:
            allowed = target in SIDE[source]
        elif target in SIDE:
            allowed = RANKS[source] >= SIDE_USERS_FROM
        else:
            allowed = RANKS[source] >= RANKS[target]
        if not allowed:
            found.append(f"{_where(edge, base)}: {edge.source} ({source}) imports {edge.target} ({target})")
    return sorted(set(found))  # `from M import a, b` is one import


def import_cycles(edges: list[Edge], base: Path) -> list[str]:
    """Each set of modules that import one another in a circle, with one such circle, each import's file and line."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
    reach = {module: _reachable(graph, module) for module in graph}
    reported: set[str] = set()
    found = []
    for module in sorted(graph):
        if module in reported or module not in reach[module]:
            continue
        members = sorted(m for m in reach[module] if module in reach.get(m, ()))
        reported.update(members)
        steps = "; ".join(f"{e.source} -> {e.target} ({_where(e, base)})" for e in _path_back(graph, module))
        found.append(f"{len(members)} modules in a cycle {members}, e.g. {steps}")
    return found


def _reachable(graph: dict[str, dict[str, Edge]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for target in graph.get(stack.pop(), {}):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def _path_back(graph: dict[str, dict[str, Edge]], start: str) -> list[Edge]:
    """The shortest import path from ``start`` back to itself, or [] (breadth-first)."""
    came: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target, edge in sorted(graph.get(module, {}).items()):
            if target == start:
                path = [edge]
                while path[0].source != start:
                    path.insert(0, came[path[0].source])
                return path
            if target not in came:
                came[target] = edge
                queue.append(target)
    return []


def terminal_use(files: dict[str, Path], edges: list[Edge], layer: str, base: Path) -> list[str]:
    """Every print, console or rich in one layer's modules."""
    found = [
        f"{_where(e, base)}: {e.source} imports lepton_cli.console"
        for e in edges
        if layer_of(e.source) == layer and (e.target == "lepton_cli.console" or "console" in e.names)
    ]
    for module, path in files.items():
        if layer_of(module) != layer:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported = [node.module or ""]
            elif isinstance(node, ast.Name) and node.id == "print":
                found.append(f"{path.relative_to(base)}:{node.lineno}: {module} uses print")
                continue
            else:
                continue
            for name in imported:
                if name == "rich" or name.startswith("rich."):
                    found.append(f"{path.relative_to(base)}:{node.lineno}: {module} imports {name}")
    return found


def pass_of(module: str) -> str | None:
    """The pass a module of lepton_cli.passes belongs to: its entry file ``<name>`` or private package ``_<name>``."""
    parts = module.split(".")
    return parts[2].lstrip("_") if len(parts) > 2 and parts[:2] == ["lepton_cli", "passes"] else None


def cross_pass_imports(edges: list[Edge], base: Path) -> list[str]:
    """Imports of one pass's entry file or private package by another pass: shared machinery belongs in model/."""
    found = []
    for edge in edges:
        source, target = pass_of(edge.source), pass_of(edge.target)
        if source and target and source != target:
            found.append(f"{_where(edge, base)}: {edge.source} ({source}) imports {edge.target} ({target})")
    return sorted(set(found))


def long_functions(files: dict[str, Path], base: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (methods and nested ones too) longer than ``limit`` lines, def line to last line."""
    found = []
    for path in files.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(base)}:{node.lineno}: {node.name} has {length} lines")
    return found


def long_entry_files(passes_dir: Path, base: Path, limit: int = MAX_ENTRY_LINES) -> list[str]:
    """Pass entry files (passes/<name>.py; machinery lives in passes/_<name>/) longer than ``limit`` lines."""
    found = []
    for path in sorted(passes_dir.glob("*.py")):
        length = len(path.read_text(encoding="utf-8").splitlines())
        if path.name != "__init__.py" and length > limit:
            found.append(f"{path.relative_to(base)} has {length} lines")
    return found


def _report(found: list[str]) -> str:
    return f"{len(found)} found:\n" + "\n".join(found)


@pytest.fixture(scope="module")
def tree() -> tuple[dict[str, Path], list[Edge]]:
    return import_edges(ROOTS)


def test_every_module_belongs_to_a_layer(tree):
    files, _ = tree
    unplaced = sorted(m for m in files if layer_of(m) not in RANKS and layer_of(m) not in SIDE)
    assert not unplaced, f"add their layer to RANKS or SIDE in {Path(__file__).name}: {unplaced}"


def test_no_import_cycle(tree):
    _, edges = tree
    found = import_cycles(edges, REPO)
    assert not found, _report(found)


def test_layers_import_downwards_only(tree):
    _, edges = tree
    found = layer_violations(edges, REPO)
    assert not found, f"the layer table is RANKS and SIDE in {Path(__file__).name}; {_report(found)}"


def test_no_pass_prints(tree):
    files, edges = tree
    found = terminal_use(files, edges, "passes", REPO)
    assert not found, "passes report through ctx.progress/ctx.warn; " + _report(found)


def test_no_pass_imports_another_pass(tree):
    _, edges = tree
    found = cross_pass_imports(edges, REPO)
    assert not found, _report(found)


def test_pass_entry_files_are_short():
    found = long_entry_files(ROOTS["lepton_cli.passes"], REPO)
    assert not found, f"move machinery into passes/_<name>/; {_report(found)}"


def test_no_function_is_long(tree):
    files, _ = tree
    found = long_functions(files, REPO)
    assert not found, _report(found)


# Each check run on a small tree with one of every fault, so none of the tests above can pass by seeing nothing.
FAULTY_TREE = {
    "lepton_cli/__init__.py": '__version__ = "0"\n',
    "lepton_cli/console.py": "",
    "lepton_cli/model/__init__.py": "",
    "lepton_cli/model/shapes.py": "def infer():\n    from lepton_cli.pipeline import run\n",
    "lepton_cli/pipeline/__init__.py": "",
    "lepton_cli/pipeline/run.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from ..model.shapes import infer\n",
    "lepton_cli/bundle/__init__.py": "from . import reader\n",
    "lepton_cli/bundle/reader.py": "import lepton_cli.compile.report\n",
    "lepton_cli/compile/__init__.py": "",
    "lepton_cli/compile/report.py": "from lepton_cli import __version__\n",
    "lepton_cli/compile/output.py": "from lepton_cli.bundle import reader\n",
    "lepton_cli/gadgets/__init__.py": "",
    "passes/__init__.py": "",
    "passes/fuse.py": "from rich.progress import Progress\nfrom lepton_cli import console\n\n\ndef fuse():\n    print(1)\n",
    "passes/prune.py": "def prune():\n"
    + "    pass\n" * MAX_FUNCTION_LINES
    + "\n" * (MAX_ENTRY_LINES - MAX_FUNCTION_LINES),
    "passes/_prune/__init__.py": "\n" * (MAX_ENTRY_LINES + 1),
    "passes/_fuse/__init__.py": "from ..prune import prune\n",
}


def test_the_checks_find_each_fault_in_a_faulty_tree(tmp_path):
    for name, text in FAULTY_TREE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    files, edges = import_edges({"lepton_cli": tmp_path / "lepton_cli", "lepton_cli.passes": tmp_path / "passes"})

    assert [layer_of(m) for m in files if layer_of(m) not in RANKS and layer_of(m) not in SIDE] == ["gadgets"]
    (cycle,) = import_cycles(edges, tmp_path)  # through a function-local and a relative TYPE_CHECKING import
    assert "lepton_cli.model.shapes -> lepton_cli.pipeline.run (lepton_cli/model/shapes.py:2)" in cycle
    assert "lepton_cli.pipeline.run -> lepton_cli.model.shapes (lepton_cli/pipeline/run.py:4)" in cycle
    assert sorted(layer_violations(edges, tmp_path)) == [
        "lepton_cli/bundle/reader.py:1: lepton_cli.bundle.reader (bundle) imports lepton_cli.compile.report (compile)",
        "lepton_cli/model/shapes.py:2: lepton_cli.model.shapes (model) imports lepton_cli.pipeline.run (pipeline)",
    ]
    assert sorted(terminal_use(files, edges, "passes", tmp_path)) == [
        "passes/fuse.py:1: lepton_cli.passes.fuse imports rich.progress",
        "passes/fuse.py:2: lepton_cli.passes.fuse imports lepton_cli.console",
        "passes/fuse.py:6: lepton_cli.passes.fuse uses print",
    ]
    assert cross_pass_imports(edges, tmp_path) == [
        "passes/_fuse/__init__.py:1: lepton_cli.passes._fuse (fuse) imports lepton_cli.passes.prune (prune)"
    ]
    assert long_entry_files(tmp_path / "passes", tmp_path) == ["passes/prune.py has 201 lines"]
    assert long_functions(files, tmp_path) == ["passes/prune.py:1: prune has 61 lines"]
