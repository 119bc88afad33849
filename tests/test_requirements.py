"""Every third-party module that the package, the experiments, the benchmarks and the tests import is pinned in
requirements.txt (CI installs a fresh virtual environment from that file alone), except the optional reference
libraries that only comparison tests and benchmarks use, when installed."""

import ast
import importlib.metadata
import os
import re
import sys

from util import ROOT

OPTIONAL = {"torch", "trl", "peft", "datasets", "libtpu", "xprof"}  # reference implementations and the profiler
# reader (benchmarks/xla_profile.py), never needed to run
LOCAL = {"align_jax", "conftest", "util", "experiments", "benchmarks", "toy_pipeline", "make_fixtures", "ablation"}
LOCAL |= {f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py")}  # they import each other


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_import_is_pinned():
    pinned = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not pinned (name==version)"
            pinned[_norm(name)] = version
    dists = importlib.metadata.packages_distributions()
    missing = []
    for folder in ("align_jax", "experiments", "benchmarks", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                for mod in _imports(os.path.join(dirpath, f)):
                    if mod in sys.stdlib_module_names or mod in LOCAL or mod in OPTIONAL or mod.startswith("test_"):
                        continue
                    names = dists.get(mod)
                    if not names or not any(_norm(n) in pinned for n in names):
                        missing.append(f"{os.path.relpath(os.path.join(dirpath, f), ROOT)}: {mod}")
    assert not missing, "imported but not in requirements.txt: " + ", ".join(sorted(set(missing)))
    for name, version in pinned.items():  # the environment running the tests is the pinned one
        assert importlib.metadata.version(name) == version, (name, importlib.metadata.version(name), version)
