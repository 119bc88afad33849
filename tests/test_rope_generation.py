"""Online RL on rope-scaled checkpoints: a tiny GRPO run and a tiny PPO run whose policy is the `llama3_rope`
fixture architecture (Llama 3.1-style RoPE scaling; random init, vocab 256 = the toy tokenizer's). Their rollouts
go through the sampler, which takes the model's graph definition (with its config) as a static jit argument.
Greedy parity of rope-scaled generation with transformers is in test_sampling.py."""

import json
import os

import numpy as np

from util import ROOT, SHARED, final_params, load_config
from align_jax.train import train

ROPE_CONFIG = os.path.join(ROOT, "tests", "fixtures", "hf", "llama3_rope", "config.json")


def token_id_reward(prompts, completions, completion_ids, **kwargs):
    """Differs between the sampled token sequences of a random model (whose text may be mostly special tokens),
    so that the advantages (and the gradients) are not zero."""
    return [float(np.mean(np.asarray(ids) % 7)) for ids in completion_ids]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f) if "loss" in m}


def _trained(workdir, steps=4):
    """The run logged every step with finite losses and moved the parameters from their random init."""
    m = _metrics(workdir)
    assert sorted(m) == list(range(1, steps + 1))
    assert all(np.isfinite(m[s]["loss"]) and m[s]["grad_norm"] > 0 for s in m)
    first, last = final_params(workdir, 2), final_params(workdir, steps)
    assert any(not np.array_equal(a, b) for a, b in zip(first, last))
    return m


def test_grpo_on_llama3_rope_scaled_policy(tmp_path):
    from align_jax.models import load_hf_config

    assert load_hf_config(ROPE_CONFIG).rope_scaling["rope_type"] == "llama3"
    wd = str(tmp_path / "grpo")
    train(load_config("grpo", "tiny", **{"model.init_from": f"random:{ROPE_CONFIG}",
                                         "rewards.functions": ("test_rope_generation:token_id_reward",)}), wd)
    m = _trained(wd)
    assert all(m[s]["reward_std"] > 0 for s in m) and m[1]["completions/mean_length"] > 0


def test_ppo_on_llama3_rope_scaled_policy_and_reward_model(tmp_path):
    """Policy and reward model (hence the value model) on the rope-scaled architecture."""
    from flax import nnx

    from align_jax.models import load_hf_config, save_reward_model
    from align_jax.models.heads import ScalarHeadModel

    rm = os.path.join(SHARED, "rope_reward_model")
    if not os.path.exists(os.path.join(rm, "config.json")):
        tmp = rm + f".tmp{os.getpid()}"
        save_reward_model(ScalarHeadModel(load_hf_config(ROPE_CONFIG), rngs=nnx.Rngs(7)), tmp, pad_token_id=0)
        try:
            os.rename(tmp, rm)
        except OSError:  # another worker made it first
            pass
    wd = str(tmp_path / "ppo")
    train(load_config("ppo", "tiny", **{"model.init_from": f"random:{ROPE_CONFIG}", "ppo.reward_model": rm}), wd)
    _trained(wd)
