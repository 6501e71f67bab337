"""The house is one-way: cli -> train (the loop) -> {evaluate, predict} -> step -> models / data -> nn.

The graph is read from the source (every `import`, function-local ones included) at the level of
segjax's top-level modules and packages (segjax.data.voc counts as "data").
"""
import ast
import os
import subprocess
import sys

import segjax

ROOT = os.path.dirname(segjax.__file__)


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "segjax" and len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            unit = _unit(rel.removesuffix(".__init__"))
            if unit is None:  # segjax/__init__.py
                continue
            edges = graph.setdefault(unit, set())
            for node in ast.walk(ast.parse(open(path).read(), path)):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    targets = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                               if node.module == "segjax" else [])
                for target in targets:
                    other = _unit(target)
                    if other and other != unit:
                        edges.add(other)
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_circle():
    graph = import_graph()
    assert {"train", "step", "evaluate", "predict", "inference", "cli", "models", "data", "nn"} <= set(graph)
    circles = sorted(unit for unit in graph if unit in _reachable(graph, unit))
    assert not circles, {unit: sorted(graph[unit]) for unit in circles}


def test_only_the_cli_imports_the_training_loop():
    graph = import_graph()
    assert sorted(unit for unit, edges in graph.items() if "train" in edges) == ["cli"]
    for tool in ("evaluate", "predict", "step", "inference"):
        assert "train" not in _reachable(graph, tool), tool
    assert "step" in graph["evaluate"] and "inference" in graph["predict"]


def test_predict_imports_without_the_loop():
    code = "import sys, segjax.predict, segjax.evaluate; print(sorted(m for m in sys.modules if m.startswith('segjax.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = ast.literal_eval(out.strip().splitlines()[-1])
    assert "segjax.predict" in loaded and "segjax.step" in loaded and "segjax.train" not in loaded, loaded
