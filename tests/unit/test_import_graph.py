"""raydapt's own modules import each other without a cycle, counting imports inside functions
too (a function-level import hides a cycle from Python, not from the design)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "raydapt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``{module: raydapt modules it imports}``, all imports and the function-level ones."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from raydapt.x import y`: y is a submodule or a name defined in raydapt.x
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `import raydapt.x.y` -> raydapt.x.y if known
                    t = t.rpartition(".")[0]
                if t and t != mod and t != "raydapt":  # the package root holds RaydaptError
                    graph[mod].add(t)
                    if id(node) not in top:
                        local[mod].add(t)
    return graph, local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_raydapt_import_graph_is_acyclic():
    graph, _ = import_graph()
    assert "raydapt.ops.submit" in graph["raydapt.ops.cli_cluster"]  # the parser sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers():
    """core imports nothing else from raydapt; nothing below ops imports ops; recipes never
    import each other; methods imports no raydapt module (its references load lazily)."""
    graph, _ = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("raydapt.core"):
            assert all(d.startswith("raydapt.core") for d in deps), (mod, deps)
        if not mod.startswith("raydapt.ops") and mod != "raydapt.cli":
            assert not any(d.startswith("raydapt.ops") for d in deps), (mod, deps)
        if mod.startswith("raydapt.recipes."):
            others = {d for d in deps if d.startswith("raydapt.recipes.")
                      and d.split(".")[2].removesuffix("_config")
                      != mod.split(".")[2].removesuffix("_config")}
            assert not others, (mod, others)
    assert graph["raydapt.methods"] == set()
