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
