"""The package's modules import one another in one direction: no module imports, even inside a function, a module
that imports it back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_gemma4"


def imported_modules(file: Path) -> set:
    """The mlx_gemma4 modules `file` imports anywhere in its body (relative or absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level == 1:
                names.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("mlx_gemma4."):
                names.add(node.module.split(".")[1])
    return names


def import_cycle_through(start: str, graph: dict) -> list:
    """A chain of imports from `start` back to itself, or [] when there is none."""
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for imported in graph.get(module, ()):
            if imported == start:
                return path + [start]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, path + [imported]))
    return []


def package_import_graph() -> dict:
    return {file.stem: imported_modules(file) for file in PACKAGE.glob("*.py") if file.stem != "__init__"}


def test_no_module_imports_one_that_imports_it_back():
    graph = package_import_graph()
    assert "processor" in graph["loading"]
    cycles = [import_cycle_through(module, graph) for module in sorted(graph)]
    assert [cycle for cycle in cycles if cycle] == []


def test_a_module_that_imports_the_loader_back_is_seen():
    graph = {"loading": {"processor"}, "processor": {"json_files", "loading"}, "json_files": set()}
    assert import_cycle_through("loading", graph) == ["loading", "processor", "loading"]
