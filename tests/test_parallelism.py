"""Every kind of trainer under a mesh that splits all three axes (data 2 x fsdp 2 x tensor 2 on 8 CPU devices: FSDP
and tensor parallelism of the policy, the reference, the reward and value models, and the sampler on the training
mesh) gives the per-step losses of the same run on one device: SFT, DPO (packed pairwise batches; ORPO reads the
same batches through the same log-prob helper; PPO's reward and value models run the scalar head sharded here),
offline GRPO (packed groups), online GRPO (RLOO is the same rollout with another advantage) and PPO."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from util import ROOT, load_config

# algorithm -> (config file, config arg, overrides)
RUNS = {
    "sft": ("sft", "tiny", {}),
    "dpo": ("dpo", "tiny", {}),
    "grpo_offline": ("grpo", "tiny,offline", {}),
    "grpo": ("grpo", "tiny", {"rewards.functions": ("toy_gold", "test_rloo:char_length_reward"),
                              "loss.kwargs.beta": 0.04}),
    "ppo": ("ppo", "tiny", {}),
}


def run(name: str, mesh: tuple[int, int, int]) -> dict[int, float]:
    """Two steps of `name` on `mesh` (data, fsdp, tensor): {step: loss}."""
    from align_jax.train import train

    file, arg, overrides = RUNS[name]
    if name == "ppo":
        import test_ppo

        overrides = {"ppo.reward_model": test_ppo._reward_model_dir()}
    c = load_config(file, arg, **{"total_steps": 2, "checkpoint.every_steps": 2, "export": False,
                                  "eval_generation": 0, "data.eval": "", "mesh.data": mesh[0], "mesh.fsdp": mesh[1],
                                  "mesh.tensor": mesh[2], **overrides})
    wd = tempfile.mkdtemp(prefix=f"par_{name}_")
    train(c, wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


REFERENCE = """
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import test_parallelism
print("RESULT", json.dumps({n: test_parallelism.run(n, (1, 1, 1)) for n in sys.argv[2].split(",")}))
"""


@pytest.fixture(scope="module")
def one_device():
    """The one-device losses of every run, computed in a subprocess started at once (it runs while this process
    computes the 8-device runs)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-c", REFERENCE, os.path.join(ROOT, "tests"), ",".join(RUNS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def result():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        return {k: {int(s): v for s, v in d.items()} for k, d in json.loads(line[7:]).items()}

    cache = {}

    def get():
        if not cache:
            cache.update(result())
        return cache

    yield get
    if proc.poll() is None:
        proc.kill()


def test_every_trainer_on_data_fsdp_tensor_equals_one_device(one_device):
    got = {name: run(name, (2, 2, 2)) for name in RUNS}
    want = one_device()
    for name in RUNS:
        assert sorted(got[name]) == sorted(want[name]) == [1, 2], (name, got[name], want[name])
        for step in (1, 2):
            np.testing.assert_allclose(got[name][step], want[name][step], rtol=1e-4, atol=2e-6,
                                       err_msg=f"{name} step {step}")
