"""The package's dependency direction (DESIGN section 5), checked on its source: config, model,
kv, checkpoint, ops -> runtime -> workloads -> perf (-> batch -> batch_ray), and no import cycle
between modules (imports inside functions count too: a late import is still a cycle)."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "moelens_jax"
# Layer of each top-level part; a module may import only from its own layer or lower ones.
LAYERS = {"config": 0, "ops": 0, "_cpu_ops": 0, "kv": 1, "model": 1, "checkpoint": 2,
          "reference": 2, "runtime": 3, "workloads": 4, "perf": 5, "batch": 6,
          "batch_ray": 7}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict) -> set[str]:
    """Package modules `name` imports (a `from pkg import x` names pkg.x when x is a module,
    else pkg)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return {m for m in out if m in mods and m != name}


def _graph():
    mods = _modules()
    return {m: _imports(m, f, mods) for m, f in mods.items()}, mods


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_part_has_a_layer():
    graph, _ = _graph()
    assert {m.split(".")[1] for m in graph if "." in m} <= set(LAYERS)


def test_dependencies_run_one_way():
    graph, mods = _graph()
    wrong = [(m, t) for m, targets in graph.items() for t in targets
             if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert not wrong, f"imports against the layering {LAYERS}: {wrong}"


def test_no_import_cycles():
    graph, mods = _graph()
    # A package __init__ re-exporting its children is not a cycle: drop parent -> child edges.
    edges = {m: {t for t in ts if not (mods[m].name == "__init__.py" and t.startswith(m + "."))}
             for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle test can fail: a fake package with a late (function-level) import cycle."""
    pkg = tmp_path / "moelens_jax"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "engine.py").write_text("def f():\n    from moelens_jax import perf\n")
    (pkg / "perf.py").write_text("from moelens_jax.runtime.engine import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph, _ = _graph()
    assert "moelens_jax.perf" in graph["moelens_jax.runtime.engine"]
    assert "moelens_jax.runtime.engine" in graph["moelens_jax.perf"]
    with pytest.raises(AssertionError, match="against the layering"):
        test_dependencies_run_one_way()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
