"""RLOO (REINFORCE Leave-One-Out, TRL 1.x `RLOOTrainer`): advantages and loss against a float64 numpy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import losses as L

TOL = dict(rtol=1e-5, atol=1e-5)
N, T = 8, 5


def f(x):
    return float(x)


# ------------------------------------------------------------------------------------ numpy reference (TRL)
def np_sequence_kl(old, ref, m):
    return ((old - ref) * m).sum(-1)


def np_rloo_adv(r, g, kl=None, beta=0.0, normalize=False):
    r = np.asarray(r, np.float64)
    if beta != 0.0:
        r = r - beta * kl
    gr = r.reshape(-1, g)
    if g > 1:
        base = ((gr.sum(1, keepdims=True) - gr) / (g - 1)).reshape(-1)
        a = r - base
    else:
        a = np.zeros_like(r)
    if normalize:
        a = (a - a.mean()) / (a.std(ddof=1) + 1e-4)
    return a


def np_rloo_loss(lp, old, adv, m, eps_lo, eps_hi, ent):
    c1 = np.exp((lp * m).sum(1) - (old * m).sum(1))
    c2 = np.clip(c1, 1 - eps_lo, 1 + eps_hi)
    loss = np.mean(-np.minimum(c1 * adv, c2 * adv))
    low = (c1 < 1 - eps_lo) & (adv < 0)
    high = (c1 > 1 + eps_hi) & (adv > 0)
    return dict(loss=loss, low=low.mean(), high=high.mean(), region=(low | high).mean(),
                entropy=(ent * m).sum() / max(m.sum(), 1))


# --------------------------------------------------------------------------------------------- random inputs
@functools.partial(jax.jit, static_argnums=(3,))
def adv_all(rewards, old, ref, group_size, m):
    kl = L.sequence_kl(old, ref, m)
    return kl, {(beta, norm): L.rloo_advantages(rewards, group_size, seq_kl=kl, beta=beta, normalize_advantages=norm)
                for beta in (0.0, 0.05) for norm in (False, True)}


@jax.jit
def loss_j(lp, old, adv, m, ent):
    return L.rloo_loss(lp, old, adv, m, epsilon=0.2, epsilon_high=0.28, token_entropy=ent)


def _inputs(seed, spread=0.3):
    rng = np.random.default_rng(seed)
    lp = rng.normal(size=(N, T)) - 2
    old = lp + rng.normal(size=(N, T)) * spread
    ref = lp + rng.normal(size=(N, T)) * spread
    m = (rng.random((N, T)) < 0.7).astype(float)
    m[0] = 0  # zero-length completions
    m[5] = 0
    rewards = rng.normal(size=N)
    return lp, old, ref, m, rewards, np.abs(rng.normal(size=(N, T)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_vs_numpy(seed):
    lp, old, ref, m, rewards, ent = _inputs(seed, spread=0.3 + 0.4 * seed)
    np.testing.assert_allclose(np.asarray(L.sequence_kl(old, ref, m)), np_sequence_kl(old, ref, m), **TOL)
    for g in (2, 4):
        kl, out = adv_all(rewards, old, ref, g, m)
        np.testing.assert_allclose(np.asarray(kl), np_sequence_kl(old, ref, m), **TOL)
        kl64 = np_sequence_kl(old, ref, m)
        for (beta, norm), adv in out.items():
            exp = np_rloo_adv(rewards, g, kl64, beta, norm)
            np.testing.assert_allclose(np.asarray(adv), exp, **TOL, err_msg=str((g, beta, norm)))
            assert adv.dtype == jnp.float32
            loss, met = loss_j(lp, old, adv, m, ent)
            ref_out = np_rloo_loss(lp, old, np.asarray(adv, np.float64), m, 0.2, 0.28, ent)
            np.testing.assert_allclose(f(loss), ref_out["loss"], **TOL, err_msg=str((g, beta, norm)))
            assert sorted(met) == ["clip_ratio/high_mean", "clip_ratio/low_mean", "clip_ratio/region_mean", "entropy"]
            for k, name in [("low", "clip_ratio/low_mean"), ("high", "clip_ratio/high_mean"),
                            ("region", "clip_ratio/region_mean"), ("entropy", "entropy")]:
                np.testing.assert_allclose(f(met[name]), ref_out[k], **TOL, err_msg=name)
    # the larger spreads actually exercise the clipped branches
    if seed == 2:
        adv = np_rloo_adv(rewards, 2)
        _, met = loss_j(lp, old, adv, m, ent)
        assert f(met["clip_ratio/region_mean"]) > 0


# ------------------------------------------------------------------------------------------------ hand values
def test_rloo_advantages_hand_values():
    # G = 2, rewards [1, 0, 0, 1]: the baseline of each is the other's reward → A = [1 − 0, 0 − 1, 0 − 1, 1 − 0]
    np.testing.assert_allclose(np.asarray(L.rloo_advantages(np.array([1.0, 0, 0, 1]), 2)), [1, -1, -1, 1])
    # G = 4, rewards [0, 1, 0, 1]: A_0 = 0 − (1+0+1)/3 = −2/3, A_1 = 1 − (0+0+1)/3 = 2/3
    np.testing.assert_allclose(np.asarray(L.rloo_advantages(np.array([0.0, 1, 0, 1]), 4)),
                               [-2 / 3, 2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    # KL folded into the reward: r = [1, 0], kl = [2, −1], β = 0.5 → r' = [0, 0.5] → A = [−0.5, 0.5]
    np.testing.assert_allclose(np.asarray(L.rloo_advantages(np.array([1.0, 0]), 2, seq_kl=np.array([2.0, -1]),
                                                            beta=0.5)), [-0.5, 0.5], rtol=1e-6)
    # β = 0 ignores seq_kl (TRL skips the KL term)
    np.testing.assert_array_equal(np.asarray(L.rloo_advantages(np.array([1.0, 0]), 2, seq_kl=np.array([9.0, 9]))),
                                  [1.0, -1.0])
    # normalize: A = [1, −1, −1, 1], mean 0, unbiased std sqrt(4/3)
    out = L.rloo_advantages(np.array([1.0, 0, 0, 1]), 2, normalize_advantages=True)
    np.testing.assert_allclose(np.asarray(out), np.array([1, -1, -1, 1]) / (np.sqrt(4 / 3) + 1e-4), rtol=1e-6)
    # G = 1: no baseline, A = 0 (also normalized: finite, 0)
    np.testing.assert_array_equal(np.asarray(L.rloo_advantages(np.array([3.0, -1]), 1)), 0.0)
    np.testing.assert_array_equal(np.asarray(L.rloo_advantages(np.array([3.0]), 1, normalize_advantages=True)), 0.0)
    # equal rewards in a group give 0
    np.testing.assert_array_equal(np.asarray(L.rloo_advantages(np.array([2.5, 2.5, 2.5, 0, 1, 2]), 3))[:3], 0.0)
    # sequence_kl: Σ_t (old − ref)·m, masked entries ignored even when inf
    old = np.array([[-1.0, -2.0, np.inf], [0.0, 0.0, 0.0]])
    ref = np.array([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    m = np.array([[1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(np.asarray(L.sequence_kl(old, ref, m)), [0.5 - 1.0, 0.0])


def test_rloo_loss_hand_values_and_clip_metrics():
    # two tokens per sequence of log-ratio 0.25 each → ρ = e^{±0.5} per sequence (1.6487 / 0.6065)
    lp = np.array([[0.25, 0.25], [-0.25, -0.25], [0.25, 0.25], [-0.25, -0.25]])
    old = np.zeros((4, 2))
    adv = np.array([1.0, -1.0, -1.0, 1.0])
    m = np.ones((4, 2))
    r = np.exp(0.5)
    loss, met = jax.jit(L.rloo_loss)(lp, old, adv, m)
    # −min(ρA, clip(ρ, 0.8, 1.2)A): [−1.2 (high-clipped), 0.8 (low-clipped), ρ, −1/ρ]
    np.testing.assert_allclose(f(loss), np.mean([-1.2, 0.8, r, -1 / r]), rtol=1e-6)
    assert f(met["clip_ratio/high_mean"]) == 0.25 and f(met["clip_ratio/low_mean"]) == 0.25
    assert f(met["clip_ratio/region_mean"]) == 0.5
    assert "entropy" not in met and "kl" not in met
    # ε_high = 0.7: 1.6487 < 1.7, so the first sequence is no longer clipped
    loss, met = jax.jit(functools.partial(L.rloo_loss, epsilon=0.2, epsilon_high=0.7))(lp, old, adv, m)
    np.testing.assert_allclose(f(loss), np.mean([-r, 0.8, r, -1 / r]), rtol=1e-6)
    assert f(met["clip_ratio/high_mean"]) == 0.0 and f(met["clip_ratio/region_mean"]) == 0.25
    # the mask decides which tokens enter the sequence log-prob: masked tokens change nothing, even NaN ones
    lp2 = np.concatenate([lp, np.full((4, 1), np.nan)], 1)
    m2 = np.concatenate([m, np.zeros((4, 1))], 1)
    loss2, _ = jax.jit(L.rloo_loss)(lp2, np.zeros((4, 3)), adv, m2)
    np.testing.assert_allclose(f(loss2), np.mean([-1.2, 0.8, r, -1 / r]), rtol=1e-6)


def test_rloo_gradient_at_ratio_one():
    lp, _, _, m, rewards, _ = _inputs(7)
    adv = np_rloo_adv(rewards, 4)
    g = jax.jit(jax.grad(lambda x: L.rloo_loss(x, lp, adv, m)[0]))(lp)  # old = current → ρ = 1, unclipped
    # d/dlogπ_t of mean_i(−ρ_i A_i) at ρ = 1 is −A_i / N on each unmasked token, 0 elsewhere
    np.testing.assert_allclose(np.asarray(g), -adv[:, None] / N * m, rtol=1e-5, atol=1e-7)


def test_rloo_extreme_and_empty_finite():
    lp, old, _, m, rewards, ent = _inputs(3)
    adv = np_rloo_adv(rewards, 2)
    big = np.full((N, T), -1e4)
    z = np.zeros((N, T))
    grad = jax.jit(jax.grad(lambda x, o, a, mm: L.rloo_loss(x, o, a, mm)[0]))
    for args in [(big, z, adv, m), (z, big, adv, m), (z, big, -adv, m), (lp, old, adv, z)]:
        loss, met = loss_j(*args, ent)
        assert np.isfinite(f(loss)) and all(np.isfinite(f(v)) for v in met.values())
        assert np.all(np.isfinite(np.asarray(grad(*args))))
    # all-empty masks: ρ = 1 for every sequence, loss = −mean(A), entropy 0, nothing clipped
    loss, met = loss_j(lp, old, adv, z, ent)
    np.testing.assert_allclose(f(loss), -adv.mean(), atol=1e-6)
    assert f(met["entropy"]) == 0.0 and f(met["clip_ratio/region_mean"]) == 0.0


def test_rloo_jit_registry_and_errors():
    lp, old, _, m, rewards, _ = _inputs(4)
    adv_jit = jax.jit(L.rloo_advantages, static_argnames=("group_size", "normalize_advantages"))
    adv = adv_jit(rewards, group_size=4, beta=jnp.float32(0.0), seq_kl=jnp.zeros(N))  # traced β
    np.testing.assert_allclose(np.asarray(adv), np_rloo_adv(rewards, 4), **TOL)
    traced_eps = jax.jit(lambda e: L.rloo_loss(lp, old, adv, m, epsilon=e)[0])(0.2)
    np.testing.assert_allclose(f(traced_eps), f(L.rloo_loss(lp, old, adv, m)[0]), **TOL)
    assert L.get_loss("rloo") is L.rloo_loss and "rloo" in L.available()
    with pytest.raises(ValueError, match="seq_kl"):
        L.rloo_advantages(rewards, 2, beta=0.05)
    with pytest.raises(ValueError, match="groups of 3"):
        L.rloo_advantages(rewards, 3)
    with pytest.raises(ValueError, match="group_size"):
        L.rloo_advantages(rewards, 0)
    with pytest.raises(ValueError, match="advantages"):
        L.rloo_loss(lp, old, np.zeros((N, T)), m)


# ------------------------------------------------------------------------------- the algorithm (align_jax.algorithms.rloo)


def char_length_reward(prompts, completions, **kwargs):
    """Varies between random completions, so tiny runs get non-zero advantages."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 10.0 for c in completions]


def test_rloo_trains_and_its_advantages_are_trl_formula_of_the_rollout(tmp_path):
    """RLOO through the shared loop: G = 4, β = 0.05, μ = 1. Each rollout's advantages equal the numpy reference
    of TRL's formula on its own rewards and log-probs; the KL is exactly 0 before the first update (π_old = π_ref)
    and > 0 after; the loss sees ratio 1 (nothing clipped, μ = 1)."""
    import dataclasses

    import align_jax.algorithms as A
    from util import load_config
    from align_jax.train import train

    calls = []
    orig = A.ALGORITHMS["rloo"]

    def recording(**kw):
        rollout = orig.make_rollout(**kw)

        def wrapped(params, next_batch, step):
            batch, m = rollout(params, next_batch, step)
            calls.append((step, batch, m, rollout.last))
            return batch, m

        return wrapped

    cfg = load_config("rloo", **{"rloo.num_generations": 4, "optimizer.learning_rate": 1e-3,
                                 "rewards.functions": ("toy_gold", "test_rloo:char_length_reward")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(A.ALGORITHMS, "rloo", dataclasses.replace(orig, make_rollout=recording))
        out = train(cfg, str(tmp_path / "run"))
    assert [s for s, *_ in calls] == [0, 1, 2, 3]
    for step, batch, m, last in calls:
        mask = batch["completion_mask"].astype(np.float64)
        kl = ((last["old_logps"].astype(np.float64) - last["ref_logps"]) * mask).sum(1)
        r = np.nan_to_num(np.asarray(last["rewards"], np.float64)) - 0.05 * kl
        g = r.reshape(-1, 4)
        want = (g - (g.sum(1, keepdims=True) - g) / 3).reshape(-1)
        np.testing.assert_allclose(batch["advantages"], want, rtol=1e-5, atol=1e-5)
        assert np.abs(want).max() > 0
        if step == 0:
            assert m["kl"] == 0.0 and np.all(kl == 0.0)
        else:
            assert m["kl"] > 0.0
        assert "old_logps" not in batch  # μ = 1: π_old is the detached current policy in the loss
    assert np.isfinite(out["loss"]) and out["clip_ratio/region_mean"] == 0.0


def test_rloo_cli_tiny_run_writes_metrics(tmp_path):
    """`python -m align_jax.main --config=configs/rloo.py:tiny` trains 4 steps and logs TRL's RLOO metrics."""
    import json
    import os
    import subprocess
    import sys

    from util import ROOT, SHARED

    wd = str(tmp_path / "cli")
    env = dict(os.environ, XLA_FLAGS=os.environ.get("TEST_XLA_FLAGS", ""), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "align_jax.main", "--config=configs/rloo.py:tiny", f"--workdir={wd}",
                        f"--config.data.toy_dir={SHARED}/toy", f"--config.data.data_dir={SHARED}/tfds"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4] and rows[-1].get("final")
    for k in ("loss", "reward", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length"):
        assert all(np.isfinite(steps[s][k]) for s in steps), k
    assert os.path.isdir(os.path.join(wd, "checkpoints", "4"))
