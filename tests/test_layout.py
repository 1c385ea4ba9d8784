"""The package layout: every module imports on its own in a fresh interpreter, and the import graph has no cycle.

The graph is read from the source (``ast``), function-level (lazy) imports included and ``TYPE_CHECKING`` blocks
excluded: ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. A cycle, even one
that only closes through a lazy import, is a failure: it means two modules own each other's concerns.
"""

from __future__ import annotations

import ast

from tests.fresh_interpreter import distribution_modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """Modules of the distribution that ``name`` imports anywhere (TYPE_CHECKING blocks excluded)."""
    out: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    out.add(target)
                elif base in modules:
                    out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the distribution's modules it imports."""
    modules = distribution_modules()
    names = set(modules)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", names)
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports_and_skips_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from x import y\n"
        "def f():\n    from x.z import w\n    from . import v\n"
    )
    assert _imports(tree, "x.m", False, {"x", "x.y", "x.z", "x.v", "x.m"}) == {"x.z", "x.v"}


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 60 and "dipreg.lenses.causal" in graph and "dipreg.eval.arms.train" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_every_module_imports_alone_in_a_fresh_interpreter(fresh_interpreter):
    assert fresh_interpreter["each_module"] is None, fresh_interpreter["each_module"]


def test_the_audit_path_never_imports_lightning(fresh_interpreter):
    assert fresh_interpreter["audit_path"] is None, fresh_interpreter["audit_path"]
