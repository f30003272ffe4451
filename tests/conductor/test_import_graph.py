"""No cycles between the top-level folders (DESIGN.md §1), and the leaves stay leaves.

Every `import` / `from ... import` in every module (inside functions too: a lazy import is
still a dependency) gives an edge between two top-level folders; the graph must be acyclic,
`engine` and `transfer_engine` import none of the others, and nothing imports `bench`.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("engine", "transfer_engine", "prefill_node", "decode_node", "conductor", "proto", "cluster", "bench")


def folder_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """folder -> imported folder -> the modules that import it."""
    graph: dict[str, dict[str, list[str]]] = {t: {} for t in TOP}
    for top in TOP:
        for path in sorted((root / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    other = name.split(".")[0]
                    if other in graph and other != top:
                        graph[top].setdefault(other, []).append(str(path.relative_to(root)))
    return graph


def find_cycle(edges: dict[str, set[str]] | dict[str, dict]) -> list[str] | None:
    """One cycle of the directed graph (its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]


def test_the_top_level_folders_import_each_other_without_a_cycle():
    graph = folder_graph()
    cycle = find_cycle(graph)
    if cycle:
        detail = "; ".join(f"{a} -> {b} ({', '.join(graph[a][b][:3])})" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle between top-level folders: {' -> '.join(cycle)}: {detail}")


def test_engine_and_transfer_engine_are_leaves_and_nothing_imports_bench():
    graph = folder_graph()
    assert graph["engine"] == {}, graph["engine"]
    assert graph["transfer_engine"] == {}, graph["transfer_engine"]
    assert {t: g["bench"] for t, g in graph.items() if "bench" in g} == {}


def test_the_conductor_core_and_the_simulator_run_without_torch():
    """The scheduling core (policies, cluster state, lifecycle) and the simulator built on it
    load no torch: a million-request simulation should not pay a second of torch import."""
    import subprocess
    import sys

    code = ("import sys; import bench.sim.cluster, bench.sim.scale, conductor.scheduler, conductor.cluster_state, "
            "conductor.lifecycle; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
