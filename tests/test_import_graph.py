"""dpdm_fast's modules import one way: the import graph, built from the source, has no cycle.

Edges are the explicit imports of each module (``import a.b`` -> a.b; ``from a import b`` -> a.b
where that is a module, else a), anywhere in the file, function-level (lazy) imports included and
imports under ``if TYPE_CHECKING:`` excluded. ``kernels/`` and ``csrc/`` install as
``dpdm_fast.kernels`` and ``dpdm_fast.csrc``. The engine's layers are checked too: a lower layer never
imports a higher one.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"dpdm_fast": ROOT / "dpdm_fast", "dpdm_fast.kernels": ROOT / "kernels", "dpdm_fast.csrc": ROOT / "csrc"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is_package)}"""
    found = {}
    for prefix, folder in TREES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            if package:
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = (path, package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes, skipping the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(child) if not isinstance(child, (ast.Import, ast.ImportFrom)) else [child]
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, (path, package) in modules.items():
        here = name if package else name.rsplit(".", 1)[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = here
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycle = _one_cycle(graph, set(component))
                if len(component) > len(cycle) - 1:
                    cycle = cycle + [f"(one cycle of a knot of {len(component)}: {', '.join(sorted(component))})"]
                cycles.append(cycle)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _one_cycle(graph, component: set) -> list[str]:
    """A concrete cycle inside a strongly connected component (breadth-first back to the start)."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & component):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return sorted(component)


def test_no_import_cycle_in_dpdm_fast():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# The engine's layers, bottom to top: a module may import its own layer and the ones below it.
ENGINE_LAYERS = ["cpu_allocator", "profiling", "mechanism", "clipping", "capture", "distributed", "sampling", "api"]


def test_engine_layers_import_downward_only():
    graph = import_graph()
    prefix = "dpdm_fast.engine."
    rank = {layer: i for i, layer in enumerate(ENGINE_LAYERS)}

    def layer(module):
        if not module.startswith(prefix):
            return None
        return rank.get(module[len(prefix):].split(".")[0])

    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not upward, "engine modules importing a higher layer:\n" + "\n".join(sorted(upward))
    assert all(not b.startswith("dpdm_fast.training") for a in graph if a.startswith(prefix) for b in graph[a])
