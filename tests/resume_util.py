"""Helpers of the kill -9 / resume tests (test_train, test_grpo, test_ppo)."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_and_kill(import_line: str, config_call: str, workdir: str, step: int = 2) -> None:
    """Runs `train(<config_call>, workdir)` in a fresh process whose config has `debug_kill_at_step=step`, so it
    SIGKILLs itself right after the checkpoint of `step` is on disk; checks that it died that way there."""
    code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
            "import conftest\n"
            "%s\n"
            "from align_jax.train import train\n"
            "train(%s, %r)\n") % (ROOT, os.path.join(ROOT, "tests"), import_line, config_call, workdir)
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
