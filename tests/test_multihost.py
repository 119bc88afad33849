"""Multi-host training: two local processes (jax.distributed on 127.0.0.1, CPU collectives via gloo), two CPU
devices each, one global 4-device FSDP mesh. Each process reads only its own shard of the data; the run must
finish on both, agree on every metric and save one checkpoint that a single process can restore."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[4])
from test_train import _cfg_dpo
from align_jax.train import train
assert jax.device_count() == 4 and jax.local_device_count() == 2
c = _cfg_dpo(None, total_steps=2, **{"checkpoint.every_steps": 2, "checkpoint.async_save": False})
c.data.toy_dir = os.path.join(sys.argv[3], "toy")
c.data.data_dir = os.path.join(sys.argv[3], "tfds_%s" % sys.argv[2])
out = train(c, os.path.join(sys.argv[3], "run"))
print("RESULT", json.dumps({"process": jax.process_index(), "loss": out["loss"]}))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_model(tmp_path):
    addr = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    # Build the toy files once so the two processes do not race on them.
    from align_jax.data.toy import generate
    generate(tmp_path / "toy", seed=0)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, addr, str(i), str(tmp_path), os.path.join(ROOT, "tests")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for o, _ in outs for line in o.splitlines()
               if line.startswith("RESULT")]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert results[0]["loss"] == results[1]["loss"] and np.isfinite(results[0]["loss"])
    # Only process 0 writes the metrics log; one checkpoint holds the global state.
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    # Each process saved its own data-iterator position next to the (global) state.
    data = sorted(os.listdir(tmp_path / "run" / "checkpoints" / "2" / "data"))
    assert [f for f in data if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]
    states = [json.load(open(tmp_path / "run" / "checkpoints" / "2" / "data" / f)) for f in data
              if f.startswith("process_")]
    assert states[0] == states[1] and states[0]  # both at the same position of their own shard
