"""GRPO: reward registry and failure handling, NaN-aware advantages, online training end to end (μ = 2 rollout
reuse, advantages of the logged rewards), exact resume after kill -9, offline GRPO on ranked groups."""

import dataclasses
import json
import logging
import math
import os

import numpy as np
import pytest

from util import final_params, load_config as _load_config, train_and_kill
from align_jax.losses import grpo_advantages, rank_advantages
from align_jax.rl import rewards as R
from align_jax import algorithms
from align_jax.algorithms.grpo import group_advantages, nan_group_advantages, offline_advantages, validate_grpo_config
from align_jax.rl.rollout import training_batch
from align_jax.train import train
from align_jax.train.validate import ConfigValueError


# ------------------------------------------------------------------ reward functions used through "module:function"


def char_length_reward(prompts, completions, **kwargs):
    """Varies between random completions, so tiny runs get non-zero advantages."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 10.0 for c in completions]


def flaky_reward(prompts, completions, **kwargs):
    """Raises on completions containing 'boom', NaN on 'nan', None on 'none', else 1.0 per character."""
    out = []
    for c in completions:
        if "boom" in c:
            raise RuntimeError("kaboom")
        out.append(math.nan if "nan" in c else None if "none" in c else float(len(c)))
    return out


def load_config(arg="tiny", **overrides):
    return _load_config("grpo", arg, **overrides)


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f) if "loss" in m}


# ------------------------------------------------------------------------------------------------ rewards


def test_reward_registry_weighted_sum_and_module_path():
    fns = R.load_reward_functions(["toy_correctness", "toy_format", "test_grpo:char_length_reward",
                                   "length_penalty"], {"length_penalty": {"soft_punish_cache": 2}})
    prompts = ["What is 3 + 4? Put the answer in brackets.", "Tell me the secret password. Give only the answer."]
    completions = ["[7]", "swordfish"]
    out = R.score(fns, [1.0, 0.5, 2.0, 1.0], prompts, completions, completion_ids=[[5, 6, 7, 2], [9, 2]],
                  max_completion_length=5)
    # correctness: 1, 0 (secret); format: 1, 0; char length: 0.3, 0.9; DAPO penalty L=5, C=2: 4 -> -1/2, 2 -> 0
    np.testing.assert_allclose(out.per_function, [[1, 1, 0.3, -0.5], [0, 0, 0.9, 0]], rtol=1e-6)
    np.testing.assert_allclose(out.total, [1 + 0.5 + 0.6 - 0.5, 1.8], rtol=1e-6)
    assert out.failures == [] and out.names[2] == "test_grpo:char_length_reward"
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        R.get_reward_function("nope")
    with pytest.raises(ValueError, match="not a reward model"):
        R.get_reward_function("rm:/some/dir")


def test_failing_reward_is_reported_and_excluded_from_group_statistics(caplog):
    fns = R.load_reward_functions(["test_grpo:flaky_reward"])
    prompts = ["p"] * 8
    completions = ["ab", "abcd", "boom", "abc", "x", "nan", "none", "none2"]  # groups of 4
    with caplog.at_level(logging.WARNING, logger="align_jax.rl.rewards"):
        out = R.score(fns, [1.0], prompts, completions)
    assert [(f.index, f.error.split(":")[0]) for f in out.failures] == [
        (2, "RuntimeError"), (5, "returned nan"), (6, "returned None"), (7, "returned None")]
    assert "test_grpo:flaky_reward" in caplog.text and "'boom'" in caplog.text and "kaboom" in caplog.text
    assert np.isnan(out.total[[2, 5, 6, 7]]).all()
    adv = group_advantages(out.total, 4)
    # group 1: finite rewards 2, 4, 3 -> mean 3, std 1; group 2: a single finite reward -> advantage 0
    np.testing.assert_allclose(adv[:4], [-1 / 1.0001, 1 / 1.0001, 0.0, 0.0], rtol=1e-5)
    np.testing.assert_array_equal(adv[4:], 0.0)
    # a second function scoring everything keeps those completions in (TRL's nansum over functions)
    two = R.score(fns + R.load_reward_functions(["test_grpo:char_length_reward"]), [1.0, 1.0], prompts, completions)
    assert not np.isnan(two.total).any() and two.total[2] == np.float32(0.4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_nan_aware_advantages_equal_library_when_finite(scale):
    r = np.random.default_rng(0).normal(size=24).astype(np.float32)
    r[4:8] = 1.5  # a zero-std group
    np.testing.assert_allclose(nan_group_advantages(r, 4, scale), grpo_advantages(r, 4, scale_rewards=scale),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(group_advantages(r, 4, scale), grpo_advantages(r, 4, scale_rewards=scale))
    # excluding an entry = computing the group's statistics without it
    rn = r.copy()
    rn[9] = np.nan
    got = np.asarray(nan_group_advantages(rn, 4, scale))
    if scale != "batch":
        keep = rn[[8, 10, 11]]
        want = grpo_advantages(keep, 3, scale_rewards=scale)
        np.testing.assert_allclose(got[[8, 10, 11]], want, rtol=1e-5, atol=1e-6)
    assert got[9] == 0.0


def test_training_batch_layout_and_mask_truncated_completions():
    ids = np.array([[0, 5, 6], [7, 8, 9]])  # B = 2 left-padded prompts
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    comp = np.array([[11, 2, 0, 0], [12, 13, 14, 15], [2, 0, 0, 0], [16, 17, 2, 0]])  # G = 2; EOS = 2
    cmask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    adv = np.array([0.5, -0.5, 1.0, -1.0])
    b = training_batch(ids, mask, comp, cmask, adv, eos_id=2, mask_truncated=True, grad_accum_steps=2)
    np.testing.assert_array_equal(b["input_ids"][1], [0, 5, 6, 12, 13, 14, 15])
    np.testing.assert_array_equal(b["input_ids"][2], [7, 8, 9, 2, 0, 0, 0])
    np.testing.assert_array_equal(b["completion_mask"], [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(b["attention_mask"][1], [0, 1, 1, 0, 0, 0, 0])  # truncated: completion masked
    np.testing.assert_array_equal(b["num_items"], 3.0)  # 6 loss tokens / 2 accumulation steps
    keep = training_batch(ids, mask, comp, cmask, adv, eos_id=2)
    np.testing.assert_array_equal(keep["completion_mask"], cmask)
    assert keep["num_items"][0] == 10.0


def test_config_refusals_name_the_key():
    with pytest.raises(ConfigValueError, match=r"checkpoint\.every_steps"):
        validate_grpo_config(load_config(**{"grpo.num_iterations": 2, "checkpoint.every_steps": 3}))
    with pytest.raises(ConfigValueError, match=r"grpo\.num_generations"):
        validate_grpo_config(load_config(**{"grpo.num_generations": 1}))
    with pytest.raises(ConfigValueError, match=r"loss\.reference_free"):
        validate_grpo_config(load_config(**{"loss.reference_free": True, "loss.kwargs.beta": 0.1}))
    validate_grpo_config(load_config(**{"grpo.num_iterations": 2, "checkpoint.every_steps": 4}))


# ------------------------------------------------------------------------------------------------ online


def _cfg_online(**kw):
    """μ = 2, G = 4, β = 0.04 (reference forward), two reward functions (the toy gold reward is mostly 0 for a
    random model; the character count varies), 4 steps, checkpoints every 2 (rollout boundaries)."""
    return load_config(**{"grpo.num_iterations": 2, "grpo.num_generations": 4, "loss.name": "grpo:dapo",
                          "loss.kwargs.beta": 0.04, "optimizer.learning_rate": 1e-3,
                          "rewards.functions": ("toy_gold", "test_grpo:char_length_reward"),
                          "rewards.weights": (1.0, 0.5), **kw})


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """One recorded online run (shared by the end-to-end and the resume tests): [(step, batch, rollout.last)]."""
    calls = []
    orig = algorithms.ALGORITHMS["grpo"]

    def recording(**kw):
        rollout = orig.make_rollout(**kw)

        def wrapped(params, next_batch, step):
            batch, m = rollout(params, next_batch, step)
            calls.append((step, batch, rollout.last))
            return batch, m

        return wrapped

    wd = str(tmp_path_factory.mktemp("grpo") / "straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(algorithms.ALGORITHMS, "grpo", dataclasses.replace(orig, make_rollout=recording))
        train(_cfg_online(), wd)
    return wd, calls


def test_grpo_trains_reuses_rollout_and_advantages_follow_rewards(online_run):
    from align_jax.data.toy import load_tokenizer, scoring

    wd, calls = online_run
    m = metrics(wd)
    assert sorted(m) == [1, 2, 3, 4]
    names = {"loss", "grad_norm", "reward", "reward_std", "rewards/toy_gold/mean", "rewards/toy_gold/std",
             "rewards/test_grpo:char_length_reward/mean", "frac_reward_zero_std", "completions/mean_length",
             "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "kl", "entropy", "log_ratio/abs_mean"}
    assert names <= set(m[1]), names - set(m[1])
    assert all(np.isfinite(m[s][k]) for s in m for k in names)
    # one rollout per μ = 2 steps, re-used as is
    assert [s for s, _, _ in calls] == [0, 1, 2, 3]
    for a, b in ((0, 1), (2, 3)):
        assert all(calls[a][1][k] is calls[b][1][k] for k in calls[a][1] if k != "first_pass")
        assert calls[a][1]["first_pass"].min() == 1.0 and calls[b][1]["first_pass"].max() == 0.0
    assert calls[1][1]["input_ids"] is not calls[2][1]["input_ids"] and calls[2][2]["step"] == 2
    assert "old_logps" in calls[0][1] and "ref_logps" in calls[0][1]
    # first pass: π_old = π exactly (ratio 1, nothing clipped); re-use: π_old != π after the first update
    assert m[1]["log_ratio/abs_mean"] == m[3]["log_ratio/abs_mean"] == m[1]["clip_ratio/region_mean"] == 0.0
    assert m[2]["log_ratio/abs_mean"] > 1e-4 and m[4]["log_ratio/abs_mean"] > 1e-4
    assert m[1]["kl"] == 0.0 < m[2]["kl"] < m[4]["kl"]  # π = π_ref exactly before the first update
    # the batch's advantages are grpo_advantages of the rewards of its decoded completions
    tok = load_tokenizer()
    for _, batch, last in calls[::2]:
        N = batch["completion_mask"].shape[1]
        texts = [tok.decode(row, skip_special_tokens=True) for row in batch["input_ids"][:, -N:]]
        assert texts == last["completions"]
        prompts = last["prompts"]
        want = np.float32(1.0) * np.asarray(scoring.gold_reward_func(prompts, texts), np.float32) + \
            np.float32(0.5) * np.asarray(char_length_reward(prompts, texts), np.float32)
        np.testing.assert_allclose(last["rewards"], want, rtol=1e-6)
        np.testing.assert_array_equal(batch["advantages"], np.asarray(grpo_advantages(last["rewards"], 4)))
        assert abs(m[last["step"] + 1]["reward"] - float(np.mean(last["rewards"]))) < 1e-5
    rows = [json.loads(line) for line in open(os.path.join(wd, "samples.jsonl"))]
    assert {r["step"] for r in rows} == {1, 3} and {"prompt", "completion", "reward", "advantage"} <= set(rows[0])


def test_resume_after_kill9_is_bit_identical(online_run, tmp_path):
    straight = online_run[0]
    killed = str(tmp_path / "killed")
    # a run that SIGKILLs itself right after the step-2 checkpoint (a rollout boundary) is on disk
    train_and_kill("from test_grpo import _cfg_online", "_cfg_online()", killed)
    train(_cfg_online(), killed)  # resumes from step 2: same prompts, same samples, same updates
    a, b = metrics(straight), metrics(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for k in ("loss", "grad_norm", "reward", "rewards/toy_gold/mean", "completions/mean_length", "entropy", "kl",
                  "log_ratio/abs_mean"):
            assert a[step][k] == b[step][k], (step, k)
    assert a[3]["grad_norm"] > 0
    sa = [json.loads(x) for x in open(os.path.join(straight, "samples.jsonl"))]
    sb = [json.loads(x) for x in open(os.path.join(killed, "samples.jsonl"))]
    assert sa == sb
    for x, y in zip(final_params(straight, 4), final_params(killed, 4)):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------ offline


def test_offline_grpo_on_ranked_groups(tmp_path):
    batch = {"ranks": np.array([[0, 2, 1, 3], [1, 0, 0, -1]]), "group_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
             "scores": np.array([[1.5, 0.0, 1.0, -1.0], [0.5, 1.5, 1.5, 0.0]], np.float32)}
    np.testing.assert_allclose(offline_advantages(batch, "ranks"), rank_advantages(batch["ranks"], batch["group_mask"]))
    sc = np.asarray(offline_advantages(batch, "scores"))
    np.testing.assert_allclose(sc[0], grpo_advantages(batch["scores"][0], 4), rtol=1e-5)
    np.testing.assert_allclose(sc[1, :3], grpo_advantages(batch["scores"][1, :3], 3), rtol=1e-5)
    assert sc[1, 3] == 0.0

    c = load_config("tiny,offline", total_steps=2, **{"checkpoint.every_steps": 2, "optimizer.learning_rate": 1e-3})
    wd = str(tmp_path / "off")
    train(c, wd)
    m = metrics(wd)
    assert sorted(m) == [1, 2]
    for k in ("loss", "entropy", "clip_ratio/region_mean", "grad_norm"):
        assert np.isfinite(m[1][k]) and np.isfinite(m[2][k])
    assert m[1]["grad_norm"] > 0 and m[1]["clip_ratio/region_mean"] == 0.0  # ratio 1: nothing clipped
