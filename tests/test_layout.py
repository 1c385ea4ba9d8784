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


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, function-level ones included, ``TYPE_CHECKING`` blocks excluded."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imports(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """Modules of the distribution that ``name`` imports anywhere (TYPE_CHECKING blocks excluded)."""
    out: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
            continue
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
    out.discard(name)
    return out


def _top_level_imports(tree: ast.AST) -> set[str]:
    """The top-level package of every absolute import in ``tree`` (``lightning`` for ``from lightning.pytorch
    import Callback``), TYPE_CHECKING blocks excluded."""
    out: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.partition(".")[0] for alias in node.names)
        elif node.level == 0 and node.module:
            out.add(node.module.partition(".")[0])
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the distribution's modules it imports."""
    modules = distribution_modules()
    names = set(modules)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", names)
        for name, path in modules.items()
    }


def external_imports() -> dict[str, set[str]]:
    """Module -> the top-level packages it imports (third-party and the standard library included)."""
    return {name: _top_level_imports(ast.parse(path.read_text())) for name, path in distribution_modules().items()}


#: Subpackages of ``dipreg`` that are not the core: training, the entry points on top of everything, and the folders
#: installed into the namespace (callbacks, eval, recipes). Every other ``dipreg`` module is the core.
NOT_CORE: tuple[str, ...] = (
    "dipreg.training",
    "dipreg.cli",
    "dipreg.bench",
    "dipreg.selftest",
    "dipreg.callbacks",
    "dipreg.eval",
    "dipreg.recipes",
)
#: What the core never imports.
CORE_FORBIDDEN: tuple[str, ...] = ("dipreg.callbacks", "dipreg.eval", "dipreg.training")
LIGHTNING: tuple[str, ...] = ("lightning", "pytorch_lightning")
#: Modules outside training and callbacks that run fits, and so import Lightning themselves.
FIT_RUNNERS: tuple[str, ...] = ("dipreg.bench.monitor", "dipreg.selftest.timing", "dipreg.eval.arms.train")


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in packages)


def is_core(name: str) -> bool:
    """A module of the core: ``dipreg`` or one of its modules outside :data:`NOT_CORE`."""
    return _under(name, ("dipreg",)) and not _under(name, NOT_CORE)


def may_import_lightning(name: str) -> bool:
    """Training, the callbacks (not ``hf``, the HF Trainer twin) and the :data:`FIT_RUNNERS`."""
    in_callbacks = _under(name, ("dipreg.callbacks",)) and name != "dipreg.callbacks.hf"
    return _under(name, ("dipreg.training",)) or in_callbacks or name in FIT_RUNNERS


def layering_violations(graph: dict[str, set[str]], external: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the README's layering rules, one line each."""
    bad = [
        f"{name} (core) imports {target}"
        for name in sorted(graph)
        if is_core(name)
        for target in sorted(graph[name])
        if _under(target, CORE_FORBIDDEN)
    ]
    bad += [
        f"{name} imports {package}"
        for name in sorted(external)
        for package in sorted(external[name] & set(LIGHTNING))
        if not may_import_lightning(name)
    ]
    return bad


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


def test_layering_rules_catch_a_planted_violation_of_each_kind():
    graph = {"dipreg.metrics": {"dipreg.eval.stats"}, "dipreg.lenses.logit": {"dipreg.adapter"}, "dipreg.cli": set()}
    external = {"dipreg.metrics": {"torch"}, "dipreg.callbacks.hf": {"lightning"}, "dipreg.training.fit": {"lightning"}}
    assert layering_violations(graph, external) == [
        "dipreg.metrics (core) imports dipreg.eval.stats",
        "dipreg.callbacks.hf imports lightning",
    ]
    assert is_core("dipreg") and is_core("dipreg.lenses.causal") and not is_core("dipreg.bench.lens")
    assert may_import_lightning("dipreg.callbacks.dip_monitor") and not may_import_lightning("dipreg.eval.arms.plan")


def test_the_core_imports_no_callbacks_eval_or_training_and_only_named_modules_import_lightning():
    graph, external = import_graph(), external_imports()
    assert "dipreg.architectures" in graph and "dipreg.memory" in graph
    assert layering_violations(graph, external) == []
    # the named fit runners are exact: each still imports Lightning (else it leaves the list)
    assert [name for name in FIT_RUNNERS if not external[name] & set(LIGHTNING)] == []
