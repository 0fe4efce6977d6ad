"""The map in docs/design.md is true: every module sits in one row, imports never go to a row below, no cycle.

Imports are read from the source (`ast`), so function-level and `TYPE_CHECKING` imports count as much as
top-level ones. `python -m tests.test_layout` prints each module's row and what it imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tp_attention", "train")


def modules(package: str) -> dict[str, Path]:
    """Dotted name -> file for every module of `package` (a package's `__init__` is the package's name)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports, wherever in the file the import is written."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def read_map(design: str) -> dict[str, list[list[str]]]:
    """Per package, its rows (lowest first) of the names written in backticks, from docs/design.md."""
    tables: dict[str, list[list[str]]] = {}
    package = None
    for line in design.splitlines():
        heading = re.match(r"^`(\w+)/` \(", line)
        if heading:
            package = heading.group(1)
            tables[package] = []
        elif package and re.match(r"^\| \d+ \|", line):
            cells = line.split("|")
            assert int(cells[1]) == len(tables[package]) + 1, f"rows of {package} out of order: {line}"
            tables[package].append(re.findall(r"`([\w.]+)`", cells[2]))
        elif package and tables[package] and not line.startswith("|"):
            package = None
    return tables


def rows(package: str, table: list[list[str]], names: set[str]) -> dict[str, int]:
    """Module -> row. A named package (`train.run`) stands for each of its modules that no row names itself."""
    qualify = {"__init__": package, f"{package}.__init__": package}
    explicit: dict[str, int] = {}
    for row, entries in enumerate(table, start=1):
        for entry in entries:
            module = qualify.get(entry, entry if entry.startswith(f"{package}.") else f"{package}.{entry}")
            assert module not in explicit, f"{module} is in rows {explicit[module]} and {row} of the map"
            exists = any(n == module or n.startswith(f"{module}.") for n in names)
            assert exists, f"the map names {module}: no such module"
            explicit[module] = row
    placed = {}
    for name in names:
        owners = [m for m in explicit if name == m or name.startswith(f"{m}.")]
        placed[name] = explicit[max(owners, key=len)] if owners else 0
    return placed


def layering_errors(graph: dict[str, set[str]], row: dict[str, int]) -> list[str]:
    """Every module missing from the map, and every import of a module from a higher row."""
    errors = [f"{name} is in no row of the map in docs/design.md" for name in graph if not row[name]]
    for name, targets in graph.items():
        package = name.partition(".")[0]
        for target in sorted(targets):
            if target.partition(".")[0] != package:
                if package == "tp_attention":
                    errors.append(f"{name} imports {target}: the library never imports train")
            elif row[target] > row[name]:
                errors.append(f"{name} (row {row[name]}) imports {target} (row {row[target]}), a row above it")
    return errors


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path for each import cycle found by a depth-first walk (empty when the graph has none)."""
    found, state = [], {}
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        while stack:
            node, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                state[node] = "done"
                stack.pop()
            elif state.get(target) == "open":
                path = [n for n, _ in stack]
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                state[target] = "open"
                stack.append((target, iter(sorted(graph.get(target, ())))))
    return found


def the_graph() -> tuple[dict[str, set[str]], dict[str, int]]:
    found = {name: path for package in PACKAGES for name, path in modules(package).items()}
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    tables = read_map((ROOT / "docs" / "design.md").read_text())
    assert set(tables) == set(PACKAGES), f"docs/design.md maps {sorted(tables)}, expected {PACKAGES}"
    row = {}
    for package in PACKAGES:
        row |= rows(package, tables[package], {n for n in found if n.partition(".")[0] == package})
    return graph, row


def test_imports_follow_the_map_and_form_no_cycle():
    graph, row = the_graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 100  # the walk found the code
    assert not layering_errors(graph, row)
    assert not cycles(graph)


def test_test_modules_do_not_import_each_other():
    found = {f"tests.{path.stem}": path for path in (ROOT / "tests").glob("test_*.py")}
    assert {name: imports(name, path, set(found)) for name, path in found.items()} == {name: set() for name in found}


def test_the_checks_see_an_upward_import_a_cycle_and_an_unmapped_module():
    graph = {"tp_attention.a": {"tp_attention.b"}, "tp_attention.b": {"tp_attention.a"}, "tp_attention.c": {"train"}}
    row = {"tp_attention.a": 1, "tp_attention.b": 2, "tp_attention.c": 0, "train": 1}
    assert layering_errors(graph, row) == [
        "tp_attention.c is in no row of the map in docs/design.md",
        "tp_attention.a (row 1) imports tp_attention.b (row 2), a row above it",
        "tp_attention.c imports train: the library never imports train",
    ]
    assert cycles(graph) == [["tp_attention.a", "tp_attention.b", "tp_attention.a"]]


def test_imports_are_read_wherever_they_are_written(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tp_attention.model import GPT\n"
        "def f():\n    from . import layers\n    import tp_attention.shm\n"
        "from tp_attention import GPT\n"
    )
    known = {"tp_attention", "tp_attention.model", "tp_attention.layers", "tp_attention.shm"}
    assert imports("tp_attention.mod", source, known) == known


@pytest.mark.parametrize("package", PACKAGES)
def test_a_named_package_covers_its_modules_and_a_name_the_map_invents_is_refused(package):
    names = {f"{package}.x", f"{package}.sub", f"{package}.sub.y", f"{package}.sub.z"}
    assert rows(package, [["x"], [f"{package}.sub"], [f"{package}.sub.z"]], names) == {
        f"{package}.x": 1,
        f"{package}.sub": 2,
        f"{package}.sub.y": 2,
        f"{package}.sub.z": 3,
    }
    with pytest.raises(AssertionError, match="no such module"):
        rows(package, [["nothing"]], names)


if __name__ == "__main__":
    graph, row = the_graph()
    for name in sorted(graph, key=lambda n: (n.partition(".")[0] != "tp_attention", row[n], n)):
        print(f"{row[name]}  {name:32} -> {', '.join(sorted(graph[name])) or '-'}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, cycles: {cycles(graph) or 'none'}")
