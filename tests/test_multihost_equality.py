"""Two processes x 2 CPU devices train exactly what one process x 4 devices trains: the same per-step losses for
DPO (with its reference log-probs precomputed on the processes) and offline GRPO (the data pipeline gives every
process its block of each global batch, so the global batches do not depend on the number of hosts; DPO's pairs and
offline GRPO's groups are packed into rows per process, which the step reads back across processes), on one
4-device FSDP mesh. (SFT, ORPO and the reward model read their batches through the same per-process loader and
packer: tests/test_parallelism.py runs them on a split mesh; online GRPO and PPO on 2 processes:
tests/test_multihost.py.)"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from util import ROOT, SHARED

ALGOS = "dpo,grpo_offline"

WORKER = r"""
import json, os, sys, tempfile
os.environ["XLA_FLAGS"] = os.environ.get("TEST_XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=%d" % int(sys.argv[3]))
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
n, i = int(sys.argv[1]), int(sys.argv[2])
if n > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[4], num_processes=n, process_id=i)
assert jax.device_count() == 4
sys.path.insert(0, sys.argv[5])
import test_parallelism
from util import load_config
from align_jax.train import train
out = {}
for name in sys.argv[6].split(","):
    file, arg, ov = test_parallelism.RUNS[name]
    if name == "dpo":  # the precomputed reference on several processes (each reads the whole table), 160 pairs
        ov = {**ov, "reference.precompute": True, "data.train": os.path.join(sys.argv[7], "..", "pairs.jsonl")}
    c = load_config(file, arg, **{"total_steps": 2, "checkpoint.every_steps": 2, "export": False, "eval_generation": 0,
                                  "data.eval": "", "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1,
                                  "checkpoint.async_save": False, "data.data_dir": os.path.join(sys.argv[7], "tfds"),
                                  **ov})
    wd = os.path.join(sys.argv[7], name)
    train(c, wd)
    if jax.process_index() == 0:
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            out[name] = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
print("RESULT", json.dumps(out))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(n, i, devices, addr, workdir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(n), str(i), str(devices), addr,
                             os.path.join(ROOT, "tests"), ALGOS, workdir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _result(proc):
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:])


def test_two_processes_train_what_one_process_trains(tmp_path):
    from align_jax.data.toy import generate

    files = generate(os.path.join(SHARED, "toy"), seed=0)  # the shared toy files exist before the processes start
    (tmp_path / "pairs.jsonl").write_text("".join(open(files["pairs"]).readlines()[:160]))
    addr = f"127.0.0.1:{_free_port()}"
    procs = [_start(2, i, 2, addr, str(tmp_path / "two")) for i in range(2)]
    one = _start(1, 0, 4, "", str(tmp_path / "one"))
    two, _, ref = _result(procs[0]), _result(procs[1]), _result(one)
    for name in ALGOS.split(","):
        assert sorted(two[name]) == sorted(ref[name]) == ["1", "2"], (name, two[name], ref[name])
        for step in ("1", "2"):
            np.testing.assert_allclose(two[name][step], ref[name][step], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{name} step {step}")
