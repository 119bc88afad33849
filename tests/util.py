"""Shared test helpers: configs on the shared toy data, and the kill -9 / resume checks (test_train, test_grpo,
test_ppo)."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The toy files and their TFDS builds are deterministic: shared between tests (cached by content hash).
SHARED = os.path.join(os.environ.get("TMPDIR", "/tmp"), "align_jax_test_data")


def load_config(name: str, arg: str = "tiny", **overrides):
    """configs/<name>.py's `get_config(arg)` reading the shared toy data; `overrides` maps dotted keys
    ("optimizer.learning_rate") to values."""
    from align_jax.cli import load_config_file

    c = load_config_file(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else ""))
    c.data.toy_dir = os.path.join(SHARED, "toy")
    c.data.data_dir = os.path.join(SHARED, "tfds")
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def train_and_kill(import_line: str, config_call: str, workdir: str, step: int = 2) -> None:
    """Runs `train(<config_call>, workdir)` in a fresh process that SIGKILLs itself right after the checkpoint of
    `step` is on disk (the test wraps `Checkpointer.save` in that process: no hook in the production loop); checks
    that it died that way there."""
    code = ("import os, signal, sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
            "import conftest\n"
            "%s\n"
            "from align_jax.train import checkpointing, train\n"
            "save = checkpointing.Checkpointer.save\n"
            "def save_then_die(self, step, *args, **kw):\n"
            "    save(self, step, *args, **kw)\n"
            "    if step == %d:\n"
            "        self.wait()\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "checkpointing.Checkpointer.save = save_then_die\n"
            "train(%s, %r)\n") % (ROOT, os.path.join(ROOT, "tests"), import_line, step, config_call, workdir)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(step)]


def final_params(workdir: str, step: int) -> list[np.ndarray]:
    """The parameters of the Orbax checkpoint of `step`, as numpy arrays (tree-leaf order)."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
        restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return [np.asarray(x) for x in jax.tree.leaves(restored["state"]["params"])]


def interrupt_and_check(proc, workdir: str, signum: int, returncode: int) -> str:
    """Sends `signum` to a training subprocess once it has logged two steps; checks its exit status and that its
    only checkpoint is its last logged step (state and log agree). Returns its stderr."""
    import json
    import time

    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(path) and len(open(path).readlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == returncode, err[-3000:]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    logged = max(m["step"] for m in map(json.loads, open(path)) if "loss" in m)
    assert saved == [logged], (saved, logged)
    return err


def load_experiment(name: str):
    """experiments/<name>.py as a module (the experiments are scripts, not a package), once per process. Several
    experiments define the same absl flag names (--size, --seeds, ...): the ones this script defines are dropped
    from the global flags before it is loaded, so the pure-function tests of every experiment can share a process."""
    import importlib.util
    import re

    from absl import flags

    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    for flag in re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', open(path).read()):
        if flag in flags.FLAGS:
            delattr(flags.FLAGS, flag)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
