"""Import cycles inside a Python package (every import counts, function-level ones too).

    python training/scripts/import_cycles.py [training/dcam]

Prints each cycle as `a -> b -> a` and exits 1 if there is one. Also used by
training/tests/test_imports.py.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def import_graph(package_dir: str | Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (relative or absolute, any nesting level)."""
    package_dir = Path(package_dir)
    pkg = package_dir.name
    modules = {p.stem for p in package_dir.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(package_dir.glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or node.module == pkg or (node.module or "").startswith(pkg + "."):
                    base = (node.module or "") if node.level else (node.module or "").removeprefix(pkg).lstrip(".")
                    if base:
                        deps.add(base.split(".")[0])
                    else:  # from . import a, b
                        deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == pkg and len(parts) > 1:
                        deps.add(parts[1])
        graph[path.stem] = {d for d in deps if d in modules and d != path.stem}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed path."""
    index, low, stack, on_stack, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on_stack.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in sccs:  # a concrete closed path inside the component, by breadth-first search back to the start
        start = min(comp)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w not in prev:
                        prev[w] = v; nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    package_dir = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "dcam")
    cycles = find_cycles(import_graph(package_dir))
    for c in cycles:
        print(" -> ".join(c))
    print(f"{len(cycles)} import cycle(s) in {package_dir}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
