"""Multi-host training: two local processes (jax.distributed on 127.0.0.1, CPU collectives via gloo), two CPU
devices each, one global 4-device FSDP mesh. Online RL (GRPO, PPO): each process samples and scores its own rows
of one global batch; the metrics equal those of one process with 4 devices fed the same global batches.
(Offline training on several processes: test_multihost_equality.py, test_multihost_resume.py and
test_launch_tpu.py's `--local 2` run.)"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ online RL

ONLINE_WORKER = r"""
import os, sys, json
nproc, pid, tmp, tests = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = os.environ.get("TEST_XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=%d" % (4 // nproc))
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py (its cache settings: inherited)
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=nproc, process_id=pid)
sys.path.insert(0, tests)
assert jax.device_count() == 4 and jax.process_count() == nproc
from align_jax.train import metrics_io, train


logged = {}  # every process's metrics (only process 0 writes metrics.jsonl)
write = metrics_io.MetricsWriter.write
def record(self, step, m, **kw):
    if "loss" in m:
        logged[str(step)] = {k: float(v) for k, v in m.items()}
    return write(self, step, m, **kw)
metrics_io.MetricsWriter.write = record

import dataclasses
from align_jax import algorithms
rows = {}  # rows of each step's batch on this process
def count_rows(name):
    orig = algorithms.ALGORITHMS[name]
    def make_rollout(**kw):
        rollout = orig.make_rollout(**kw)
        def call(params, next_batch, step):
            batch, m = rollout(params, next_batch, step)
            rows.setdefault(name, []).append(len(batch["input_ids"]))
            return batch, m
        return call
    algorithms.ALGORITHMS[name] = dataclasses.replace(orig, make_rollout=make_rollout)
count_rows("grpo"), count_rows("ppo")

from test_grpo import _cfg_online
from test_ppo import load_config as ppo_config
# one rollout each: GRPO's first pass and re-use (π_old), PPO's two minibatches
short = {"total_steps": 2, "checkpoint.every_steps": 2}
# GRPO also answers 8 held-out prompts greedily at the end (eval_generation: the same prompts on every process)
runs = {"grpo": _cfg_online(**{"grpo.scale_rewards": "batch", "eval_generation": 8, **short}),
        "ppo": ppo_config(**{"ppo.num_ppo_epochs": 1, "ppo.num_mini_batches": 2, "ppo.value_model": "shared",
                             **short})}
out = {}
for name, c in runs.items():
    c.data.toy_dir = os.path.join(tmp, "toy")
    c.data.data_dir = os.path.join(tmp, "tfds_%d_%d" % (nproc, pid))
    logged = {}
    final = train(c, os.path.join(tmp, "%s_%d" % (name, nproc)))
    out[name] = logged
    out[name]["final"] = {k: v for k, v in final.items() if k.startswith("eval/")}
print("RESULT", json.dumps({"process": jax.process_index(), "metrics": out, "rows": rows}))
"""

# Timing metrics, different in every run.
_TIMING = ("rollout_seconds", "tokens_per_second", "eps", "step_seconds", "timing/sampling_seconds",
           "timing/scoring_seconds", "timing/logps_seconds", "timing/update_seconds")


def _start_workers(nproc, tmp_path, env):
    addr = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen([sys.executable, "-c", ONLINE_WORKER, addr, str(nproc), str(i), str(tmp_path),
                              os.path.join(ROOT, "tests")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(nproc)]


def _results(procs):
    """Each worker's {"metrics": {algorithm: {step: metrics}}, "rows": {algorithm: [rows per step]}}, in process
    order."""
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-5000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for o, _ in outs for line in o.splitlines()
               if line.startswith("RESULT")]
    assert sorted(r["process"] for r in results) == list(range(len(procs)))
    return sorted(results, key=lambda r: r["process"])


def test_online_rl_on_two_processes_equals_one(tmp_path):
    """GRPO (μ = 2, β > 0, batch-scaled rewards, a generation eval at the end) and PPO (2 minibatches per
    rollout) on 2 processes x 2 devices and on 1 process x 4 devices, the same global batches: both processes log
    the same metrics, and they equal the single process's (the sampler draws the same completions from the same
    global batch)."""
    from test_ppo import _reward_model_dir
    from align_jax.data.toy import generate

    _reward_model_dir()  # made once, before the workers read it
    generate(tmp_path / "toy_all", seed=0)
    os.makedirs(tmp_path / "toy")
    for name, n in (("prompts", 64), ("eval_prompts", 8)):  # small: quick to build and check
        with open(tmp_path / "toy_all" / f"{name}.jsonl") as f, open(tmp_path / "toy" / f"{name}.jsonl", "w") as g:
            g.writelines(f.readlines()[:n])
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    two, one = _start_workers(2, tmp_path, env), _start_workers(1, tmp_path, env)  # all at once: less idle time
    two, one = _results(two), _results(one)[0]
    # each process trained on its half of each global batch: GRPO 8 prompts x 4 samples, PPO minibatches of 4
    assert one["rows"] == {"grpo": [32, 32], "ppo": [4, 4]}
    assert two[0]["rows"] == two[1]["rows"] == {"grpo": [16, 16], "ppo": [2, 2]}
    two, one = [r["metrics"] for r in two], one["metrics"]
    gen = [r["grpo"].pop("final") for r in (two[0], two[1], one)] + [two[0]["ppo"].pop("final")]
    assert gen[0] == gen[1] == gen[2] and "eval/gen/gold_reward" in gen[0] and gen[3] == {}, gen
    for r in (two[1], one):
        r["ppo"].pop("final")
    for name in ("grpo", "ppo"):
        assert sorted(two[0][name], key=int) == ["1", "2"], two[0][name].keys()
        for step, m in two[0][name].items():
            m = {k: v for k, v in m.items() if k not in _TIMING}
            assert m == {k: v for k, v in two[1][name][step].items() if k not in _TIMING}, (name, step)
            ref = one[name][step]
            assert set(m) == set(ref) - set(_TIMING)
            for k, v in m.items():
                assert abs(v - ref[k]) <= 1e-5 * max(1.0, abs(ref[k])), (name, step, k, v, ref[k])
    assert two[0]["grpo"]["2"]["grad_norm"] > 0 and two[0]["ppo"]["2"]["grad_norm"] > 0
    assert two[0]["grpo"]["2"]["log_ratio/abs_mean"] > 0 and two[0]["grpo"]["2"]["kl"] > 0
    # only process 0 wrote the sample log, the global batch's first rows
    for name in ("grpo", "ppo"):
        rows = [json.loads(x) for x in open(tmp_path / f"{name}_2" / "samples.jsonl")]
        want = [json.loads(x) for x in open(tmp_path / f"{name}_1" / "samples.jsonl")]
        assert len(rows) == len(want) == 8
        for a, b in zip(rows, want):  # the same completions; scores to float rounding (other collectives)
            assert a.keys() == b.keys() and a["prompt"] == b["prompt"] and a["completion"] == b["completion"]
            np.testing.assert_allclose([a["reward"], a["advantage"]], [b["reward"], b["advantage"]], atol=1e-5)
