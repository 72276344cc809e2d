"""The library's shape: no import cycles, no import of the training application, small modules.

The import graph is read from the source with ``ast`` (every ``import``/``from ... import``,
including those inside functions), so a cycle hidden behind a lazy import counts too. Imports of a
module's own parent packages are left out: Python initialises a package before any of its
submodules anyway, so they add no ordering constraint.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spngd_ext"
APPLICATION = "spngd_ext.train"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def library_modules() -> dict[str, Path]:
    return {m: p for m, p in all_modules().items() if not (m == APPLICATION or m.startswith(APPLICATION + "."))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (resolved to the deepest known module)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):  # not a parent package
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("spngd_ext"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("spngd_ext"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                add(candidate if candidate in known else base)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(all_modules())
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_resolves_relative_and_lazy_imports(tmp_path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from .. import ops\nfrom ..state import buffers\n\ndef f():\n    from ..train import cli\n")
    known = {
        "spngd_ext",
        "spngd_ext.ops",
        "spngd_ext.state",
        "spngd_ext.state.buffers",
        "spngd_ext.train",
        "spngd_ext.train.cli",
        "spngd_ext.x.mod",
    }
    got = imported_modules("spngd_ext.x.mod", source, known)
    assert got == {"spngd_ext.ops", "spngd_ext.state.buffers", "spngd_ext.train.cli"}


def test_library_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(all_modules()))
    assert cycles == [], f"import cycles: {cycles}"


def test_library_never_imports_the_training_application() -> None:
    graph = import_graph(library_modules())
    offenders = {
        m: sorted(t for t in targets if t == APPLICATION or t.startswith(APPLICATION + "."))
        for m, targets in graph.items()
    }
    offenders = {m: t for m, t in offenders.items() if t}
    assert offenders == {}, f"library modules importing {APPLICATION}: {offenders}"


@pytest.mark.parametrize("name", sorted(library_modules()))
def test_library_module_is_at_most_400_lines(name: str) -> None:
    lines = len(library_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}): split it along its concepts"
