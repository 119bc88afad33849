"""Modules use each other's public names only: no `from align_jax.x import _private` anywhere in the package,
the experiments or the benchmarks (a private name is free to change inside its module)."""

import ast
import os

from util import ROOT


def test_no_private_name_crosses_a_module():
    found = []
    for folder in ("align_jax", "experiments", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("align_jax")):
                        found += [f"{os.path.relpath(path, ROOT)}:{node.lineno}: {a.name}" for a in node.names
                                  if a.name.startswith("_")]
    assert not found, "private names imported from another module: " + "; ".join(found)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph(package: str = "align_jax") -> dict[str, set[str]]:
    """{module: project modules it imports}, from every import statement (module level and inside functions).
    Importing a.b.c also runs the packages a and a.b (their __init__), except those that contain the importer."""
    modules, paths = set(), {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = _module_name(path)
                modules.add(name)
                paths[name] = path
    graph = {}
    for name, path in paths.items():
        is_pkg = path.endswith("__init__.py")
        here = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        edges = set()
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                m = ".".join(parts[:i])
                if m in modules and m != name and not (name + ".").startswith(m + "."):
                    edges.add(m)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_and_the_package_rule():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    g = import_graph()
    # a submodule importing a sibling does not run its own package's __init__ again ...
    assert "align_jax.algorithms" not in g["align_jax.algorithms.dpo"]
    # ... but importing another package's module does run that package's __init__
    assert {"align_jax.models", "align_jax.models.logps"} <= g["align_jax.algorithms.dpo"]
    assert "align_jax.algorithms.dpo" in g["align_jax.algorithms"]


def test_no_import_cycle_among_project_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_training_loop_names_no_algorithm():
    """align_jax/train/ talks to the Algorithm interface only: it imports no algorithm module and names none (the
    base config's default `algorithm = "dpo"` aside)."""
    graph = import_graph()
    algos = {m for m in graph if m.startswith("align_jax.algorithms.") and m != "align_jax.algorithms.base"}
    for mod, edges in graph.items():
        if mod.startswith("align_jax.train"):
            assert not edges & algos, (mod, edges & algos)
            if mod == "align_jax.train.config_base":
                continue
            src = open(os.path.join(ROOT, *mod.split(".")) + (".py" if not mod.endswith("train") else "/__init__.py"))
            text = src.read()
            for name in ("\"dpo\"", "\"grpo\"", "\"ppo\"", "\"sft\"", "\"orpo\"", "\"reward_model\"", "'grpo'",
                         "'ppo'", "'sft'"):
                assert name not in text, (mod, name)
