"""PPO: the rollout math against a line-by-line numpy transcription of TRL's PPOTrainer, training end to end with
each value-model option, exact resume after kill -9, config refusals."""

import json
import os

import jax
import numpy as np
import pytest

from util import SHARED, final_params, load_config as _load_config, train_and_kill
from align_jax.algorithms.ppo import ppo_advantages
from align_jax.train import train
from align_jax.train.validate import ConfigValueError

INVALID_LOGPROB = 1.0  # TRL's fill value for padded log-probs


# ------------------------------------------------------------------ TRL PPOTrainer steps 3-6, transcribed to numpy


def _trl_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _trl_masked_var(x, mask):
    mean = _trl_masked_mean(x, mask)
    var = _trl_masked_mean((x - mean) ** 2, mask)
    return var * mask.sum() / (mask.sum() - 1)


def _trl_masked_whiten(x, mask, shift_mean=True):
    mean, var = _trl_masked_mean(x, mask), _trl_masked_var(x, mask)
    w = (x - mean) / np.sqrt(var + 1e-8)
    return w if shift_mean else w + mean


def trl_reference(responses, scores, logprobs, ref_logprobs, values, *, pad, eos, kl_coef, kl_estimator, gamma,
                  lam, whiten_rewards, missing_eos_penalty):
    """TRL (trl/experimental/ppo/ppo_trainer.py, `train`), with `stop_token_id = eos`: responses are already
    truncated after EOS and padded with `pad` (our sampler's output)."""
    B, N = responses.shape
    scores = scores.astype(np.float64).copy()
    is_pad = responses == pad
    sequence_lengths = np.where(is_pad.any(1), is_pad.argmax(1), N) - 1  # first_true_indices(... == pad) - 1
    contain_eos = (responses == eos).any(-1)
    if missing_eos_penalty is not None:
        scores[~contain_eos] -= missing_eos_penalty
    idx = np.tile(np.arange(N), (B, 1))
    padding_mask = idx > sequence_lengths[:, None]
    logprobs = np.where(padding_mask, INVALID_LOGPROB, logprobs)
    ref_logprobs = np.where(padding_mask, INVALID_LOGPROB, ref_logprobs)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = idx > sequence_lengths_p1[:, None]
    values = np.where(padding_mask_p1, 0.0, values)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (np.exp(logr) - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.copy()
    actual_end = np.where(sequence_lengths_p1 < N, sequence_lengths_p1, sequence_lengths)
    rewards[np.arange(B), actual_end] += scores
    if whiten_rewards:
        rewards = _trl_masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = np.where(padding_mask_p1, 0.0, rewards)
    lastgaelam = 0.0
    adv_reversed = []
    for t in reversed(range(N)):
        nextvalues = values[:, t + 1] if t < N - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        adv_reversed.append(lastgaelam)
    advantages = np.stack(adv_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, ~padding_mask)
    advantages = np.where(padding_mask, 0.0, advantages)
    return {"scores": scores, "advantages": advantages, "returns": returns, "values": values, "kl": kl,
            "padding_mask": padding_mask, "padding_mask_p1": padding_mask_p1, "rewards": rewards}


@pytest.mark.parametrize("kl_estimator,whiten,penalty", [("k1", False, None), ("k3", True, 1.0),
                                                         ("k1", True, 0.5)])
def test_rollout_math_equals_trl(kl_estimator, whiten, penalty):
    rng = np.random.default_rng(0)
    B, N, pad, eos = 6, 7, 0, 2
    lengths = [7, 3, 1, 5, 7, 2]  # rows 0 and 4 fill all N slots; row 0 ends without EOS, row 4 with EOS last
    ids = rng.integers(3, 20, (B, N))
    mask = np.zeros((B, N), np.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        if i != 0:
            ids[i, n - 1] = eos
        ids[i, n:] = pad
    scores = rng.normal(size=B).astype(np.float32)
    logps = -rng.uniform(0.1, 3, (B, N)).astype(np.float32)
    ref = logps + rng.normal(0, 0.3, (B, N)).astype(np.float32)
    values = rng.normal(size=(B, N)).astype(np.float32)
    kw = dict(kl_coef=0.05, kl_estimator=kl_estimator, gamma=1.0, lam=0.95, whiten_rewards=whiten,
              missing_eos_penalty=penalty)
    ours = jax.jit(lambda *a: ppo_advantages(*a, eos_id=eos, **kw))(scores, logps, ref, values, ids, mask)
    want = trl_reference(ids, scores, logps, ref, values, pad=pad, eos=eos, **kw)
    m, vm = ~want["padding_mask"], ~want["padding_mask_p1"]
    np.testing.assert_array_equal(np.asarray(ours["value_mask"]) > 0, vm)
    np.testing.assert_allclose(ours["scores"], want["scores"], rtol=1e-6)
    np.testing.assert_allclose(ours["kl"], np.where(m, want["kl"], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.where(vm, ours["rewards"], 0), want["rewards"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["advantages"], want["advantages"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["returns"], np.where(vm, want["returns"], 0), rtol=1e-5, atol=1e-5)
    # the score sits on EOS + 1 (rows 1, 2, 3, 5) or on the last slot (rows 0 and 4), as TRL's actual_end
    if not whiten:
        score_at = np.where(vm, np.asarray(ours["rewards"]) + 0.05 * np.asarray(ours["kl"]), 0.0)
        expected = np.zeros((B, N))
        expected[np.arange(B), [6, 3, 1, 5, 6, 2]] = want["scores"]
        np.testing.assert_allclose(score_at, expected, rtol=1e-5, atol=1e-5)
    assert float(ours["scores"][0]) == pytest.approx(scores[0] - (penalty or 0.0), rel=1e-6)  # row 0: no EOS


def test_minibatch_losses_equal_trl():
    """TRL PPOTrainer's minibatch block (pg_losses/pg_losses2, vf_losses1/2 with `cliprange_value`, masked means
    over ~padding_mask and ~padding_mask_p1, the clip fractions) vs the loss library on the same arrays."""
    from align_jax import losses

    rng = np.random.default_rng(1)
    B, N = 5, 6
    lengths = np.array([6, 2, 4, 1, 5])
    t = np.arange(N)[None]
    padding_mask = t > (lengths - 1)[:, None]
    padding_mask_p1 = t > lengths[:, None]
    old = -rng.uniform(0.1, 2, (B, N))
    new = old + rng.normal(0, 0.3, (B, N))
    adv = rng.normal(size=(B, N))
    vpred, old_v, ret = rng.normal(size=(B, N)), rng.normal(size=(B, N)), rng.normal(size=(B, N))
    cliprange, cliprange_value = 0.2, 0.2
    # TRL (float64)
    new_f = np.where(padding_mask, INVALID_LOGPROB, new)
    old_f = np.where(padding_mask, INVALID_LOGPROB, old)
    vpred_f = np.where(padding_mask_p1, 0.0, vpred)
    vclip = np.clip(vpred_f, old_v - cliprange_value, old_v + cliprange_value)
    vf1, vf2 = (vpred_f - ret) ** 2, (vclip - ret) ** 2
    vf_loss = 0.5 * _trl_masked_mean(np.maximum(vf1, vf2), ~padding_mask_p1)
    vf_clipfrac = _trl_masked_mean((vf2 > vf1).astype(float), ~padding_mask_p1)
    ratio = np.exp(new_f - old_f)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss = _trl_masked_mean(np.maximum(pg1, pg2), ~padding_mask)
    pg_clipfrac = _trl_masked_mean((pg2 > pg1).astype(float), ~padding_mask)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    ours_pg, pm = losses.ppo_policy_loss(f32(new), f32(old), f32(adv), f32(~padding_mask), clip=cliprange)
    ours_vf, vm = losses.ppo_value_loss(f32(vpred), f32(old_v), f32(ret), f32(~padding_mask_p1),
                                        clip_value=cliprange_value)
    np.testing.assert_allclose(float(ours_pg), pg_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(ours_vf), vf_loss, rtol=1e-5, atol=1e-6)
    assert float(pm["policy/clipfrac"]) == pytest.approx(pg_clipfrac, abs=1e-6)
    assert float(vm["val/clipfrac"]) == pytest.approx(vf_clipfrac, abs=1e-6)
    assert 0 < pg_clipfrac < 1 and 0 < vf_clipfrac < 1  # both clip branches are exercised


# ------------------------------------------------------------------ end to end


def load_config(arg="tiny", **overrides):
    return _load_config("ppo", arg, **{"ppo.reward_model": _reward_model_dir(), **overrides})


def _reward_model_dir() -> str:
    """A randomly initialised toy reward model in the reward-model trainer's export format (made once)."""
    path = os.path.join(SHARED, "ppo_reward_model")
    if not os.path.exists(os.path.join(path, "config.json")):
        from flax import nnx
        from transformers import AutoTokenizer

        from align_jax.data.toy import TOKENIZER_DIR, toy_model_config
        from align_jax.models import from_hf_config
        from align_jax.models.heads import ScalarHeadModel
        from align_jax.train.model import export

        rm = ScalarHeadModel(from_hf_config(toy_model_config()), rngs=nnx.Rngs(7))
        tmp = path + f".tmp{os.getpid()}"
        export(None, rm, AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)), tmp)
        os.makedirs(SHARED, exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another worker made it first
            pass
    return path


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f) if "loss" in m}


TRL_NAMES = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_token_var", "val/num_eos_tokens", "eps",
             "episode")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ppo") / "straight")
    train(load_config(), wd)
    return wd


def test_ppo_trains_with_trl_metric_names(straight_run):
    m = metrics(straight_run)
    assert sorted(m) == [1, 2, 3, 4]
    for step in m.values():
        for name in TRL_NAMES:
            assert name in step and np.isfinite(step[name]), name
    # two PPO epochs over one rollout: steps 1-2 share rollout 1 (same samples), 3-4 rollout 2
    assert m[1]["objective/scores"] == m[2]["objective/scores"] != m[3]["objective/scores"]
    assert m[2]["episode"] == 8 and m[4]["episode"] == 16
    # at the first update the policy is the reference and pi_old: KL 0, ratio 1 (up to float noise)
    assert m[1]["objective/kl"] == 0.0
    assert abs(m[1]["val/ratio"] - 1.0) < 1e-5 and m[1]["policy/clipfrac_avg"] == 0.0
    # the second pass over the same rollout moved the policy away from pi_old
    assert m[2]["policy/approxkl_avg"] > m[1]["policy/approxkl_avg"]
    assert m[3]["objective/kl"] != 0.0
    rows = [json.loads(x) for x in open(os.path.join(straight_run, "samples.jsonl"))]
    assert [r["step"] for r in rows][:1] == [1] and {"prompt", "completion", "reward"} <= set(rows[0])


def test_shared_backbone_value_head_trains(tmp_path):
    out = train(load_config(**{"ppo.value_model": "shared", "total_steps": 2}), str(tmp_path))
    assert np.isfinite(out["loss"]) and out["loss/value_avg"] > 0


def test_value_model_initialisation():
    """reward_model: the reward model's backbone and head; policy: a separate copy of the policy's backbone."""
    from flax import nnx

    from align_jax.parallel import make_mesh
    from align_jax.algorithms.ppo import build_policy_value_model
    from align_jax.rl.reward_model import load_reward_model

    mesh = make_mesh(1, -1, 1)
    rm = load_reward_model(_reward_model_dir())
    pv = build_policy_value_model(load_config(), mesh)
    np.testing.assert_array_equal(np.asarray(pv.value.score[...]), np.asarray(rm.score[...]))
    np.testing.assert_array_equal(np.asarray(pv.value.backbone.embed[...]), np.asarray(rm.backbone.embed[...]))
    pv = build_policy_value_model(load_config(**{"ppo.value_model": "policy"}), mesh)
    np.testing.assert_array_equal(np.asarray(pv.value.backbone.embed[...]), np.asarray(pv.policy.embed[...]))
    assert pv.value.backbone is not pv.policy
    n_policy = sum(x.size for x in jax.tree.leaves(nnx.state(pv.policy, nnx.Param)))
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(pv, nnx.Param)))
    assert n_all == 2 * n_policy + pv.policy.config.hidden_size  # two backbones + the value head


def test_resume_after_kill9_is_bit_identical(straight_run, tmp_path):
    killed = str(tmp_path / "killed")
    train_and_kill("from test_ppo import load_config", "load_config()", killed)
    train(load_config(), killed)  # resumes at step 2: same prompts, same samples (sampler RNG), same updates
    a, b = metrics(straight_run), metrics(killed)
    for step in (3, 4):
        for k in ("loss", "objective/scores", "objective/kl", "loss/value_avg", "grad_norm"):
            assert a[step][k] == b[step][k], (step, k)
    for x, y in zip(final_params(straight_run, 4), final_params(killed, 4)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("override,key", [
    ({"ppo.num_mini_batches": 3}, "ppo.num_mini_batches"),
    ({"checkpoint.every_steps": 3}, "checkpoint.every_steps"),
    ({"ppo.reward_model": "/nonexistent"}, "ppo.reward_model"),
    ({"ppo.value_model": "bogus"}, "ppo.value_model"),
    ({"ppo.kl_estimator": "k2"}, "ppo.kl_estimator"),
    ({"loss.name": "dpo:sigmoid"}, "loss.name"),
])
def test_config_refusals_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigValueError, match=key.replace(".", r"\.")):
        train(load_config(**override), str(tmp_path))


def test_grpo_with_a_trained_reward_model_as_reward(tmp_path):
    """The same reward-model export as a GRPO reward ("rm:<dir>"): scores logged per function, finite."""
    from test_grpo import load_config as grpo_config

    spec = "rm:" + _reward_model_dir()
    c = grpo_config(**{"total_steps": 2, "checkpoint.every_steps": 2})
    c.rewards.functions, c.rewards.weights = (spec,), (1.0,)
    out = train(c, str(tmp_path))
    assert np.isfinite(out[f"rewards/{spec}/mean"]) and out[f"rewards/{spec}/num_failed"] == 0
    assert out[f"rewards/{spec}/std"] > 0  # a random reward model still scores different completions differently
