"""Value tests for the RL losses (GRPO family, PPO pieces) against float64 numpy references."""

import functools

import jax
import numpy as np
import pytest

from align_jax import losses as L

TOL = dict(rtol=2e-5, atol=2e-5)
SCALES = ("group", "batch", "none")
GRPO_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
B, T = 6, 5


def f(x):
    return float(x)


# --------------------------------------------------------------------------------------------- advantages
@functools.partial(jax.jit, static_argnums=1)
def adv_all(rewards, group_size):
    return {s: L.grpo_advantages(rewards, group_size, scale_rewards=s) for s in SCALES}


def np_adv(r, g, scale):
    gr = r.reshape(-1, g)
    a = (gr - gr.mean(1, keepdims=True)).reshape(-1)
    if scale == "group":
        std = np.repeat(gr.std(1, ddof=1) if g > 1 else np.zeros(len(gr)), g)
        a = a / (std + 1e-4)
    elif scale == "batch":
        a = a / (r.std(ddof=1) + 1e-4)
    return a


def test_grpo_advantages_vs_numpy():
    rng = np.random.default_rng(0)
    r = rng.normal(size=12)
    r[4:8] = 1.5  # a group with equal rewards
    for g in (4, 1):
        out = adv_all(r, g)
        for s in SCALES:
            np.testing.assert_allclose(np.asarray(out[s]), np_adv(r, g, s), rtol=1e-5, atol=1e-5, err_msg=s)
    out = adv_all(r, 4)
    np.testing.assert_array_equal(np.asarray(out["group"])[4:8], 0.0)
    # hand value: group [0, 1, 2, 3]: mean 1.5, unbiased std sqrt(5/3)
    out = adv_all(np.array([0.0, 1.0, 2.0, 3.0]), 4)
    np.testing.assert_allclose(np.asarray(out["group"]), (np.arange(4) - 1.5) / (np.sqrt(5 / 3) + 1e-4), rtol=1e-6)


@jax.jit
def rank_adv_all(ranks, mask):
    return {s: L.rank_advantages(ranks, mask, scale_rewards=s) for s in SCALES}


def test_rank_advantages_hand_values():
    ranks = np.array([[0, 1, 2, 3], [0, 0, 1, 1], [2, 0, 9, 9], [0, 5, 5, 5]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    out = {k: np.asarray(v) for k, v in rank_adv_all(ranks, mask).items()}
    u = np.array([[1, 1 / 3, -1 / 3, -1], [2 / 3, 2 / 3, -2 / 3, -2 / 3], [-1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(out["none"], u, **TOL)
    std0, std1, std2 = np.std(u[0], ddof=1), np.std(u[1], ddof=1), np.std(u[2, :2], ddof=1)
    exp = np.stack([u[0] / (std0 + 1e-4), u[1] / (std1 + 1e-4), u[2] / (std2 + 1e-4), u[3]])
    np.testing.assert_allclose(out["group"], exp, rtol=1e-5)
    valid = u[mask > 0]
    np.testing.assert_allclose(out["batch"], np.where(mask > 0, u / (valid.std(ddof=1) + 1e-4), 0), rtol=1e-5)
    # tied items get equal advantage; each group sums to 0; the rank encoding does not matter
    out2 = rank_adv_all(ranks * 10 + 3, mask)
    np.testing.assert_allclose(np.asarray(out2["group"]), out["group"], rtol=1e-6)
    np.testing.assert_allclose(out["group"].sum(1), 0.0, atol=1e-5)


# --------------------------------------------------------------------------------------------------- GRPO
def np_grpo(lp, old, adv, m, ref, beta, eps_lo, eps_hi, loss_type, level, L_max):
    adv = adv[:, None]
    lr = lp - old
    if level == "token":
        lw = lr
    else:
        lw = ((lr * m).sum(1) / np.maximum(m.sum(1), 1))[:, None]
    c1 = np.exp(lw)
    c2 = np.clip(c1, 1 - eps_lo, 1 + eps_hi)
    per = -np.minimum(c1 * adv, c2 * adv)
    kl = np.exp(ref - lp) - (ref - lp) - 1
    per = per + beta * kl
    per = np.broadcast_to(per, m.shape)
    if loss_type == "grpo":
        loss = np.mean((per * m).sum(1) / np.maximum(m.sum(1), 1))
    elif loss_type in ("bnpo", "dapo"):
        loss = (per * m).sum() / max(m.sum(), 1)
    else:
        loss = (per * m).sum() / (m.shape[0] * L_max)
    low = ((c1 < 1 - eps_lo) & (adv < 0)).astype(float)
    high = ((c1 > 1 + eps_hi) & (adv > 0)).astype(float)

    def gm(x):
        if x.shape[1] == 1:
            return x.mean()
        return (x * m).sum() / max(m.sum(), 1)

    return loss, (kl * m).sum() / max(m.sum(), 1), gm(low), gm(high), gm(np.maximum(low, high))


@jax.jit
def grpo_all(lp, old, adv, m, ref, ent):
    out = {}
    for t in GRPO_TYPES:
        for level in ("token", "sequence"):
            for beta in (0.0, 0.04):
                out[t, level, beta] = L.grpo_loss(lp, old, adv, m, ref_token_logps=ref, beta=beta, epsilon=0.2,
                                                  epsilon_high=0.28, loss_type=t, importance_sampling_level=level,
                                                  max_completion_length=8, token_entropy=ent)
    return out


def _grpo_inputs(seed, spread=0.3):
    rng = np.random.default_rng(seed)
    lp = rng.normal(size=(B, T)) - 2
    old = lp + rng.normal(size=(B, T)) * spread
    ref = lp + rng.normal(size=(B, T)) * spread
    m = (rng.random((B, T)) < 0.7).astype(float)
    m[0] = 0  # an empty completion
    return lp, old, rng.normal(size=B), m, ref, np.abs(rng.normal(size=(B, T)))


@pytest.mark.parametrize("seed,spread", [(0, 0.3), (1, 1.0)])
def test_grpo_loss_vs_numpy(seed, spread):
    lp, old, adv, m, ref, ent = _grpo_inputs(seed, spread)
    out = grpo_all(lp, old, adv, m, ref, ent)
    for (t, level, beta), (loss, met) in out.items():
        exp = np_grpo(lp, old, adv, m, ref, beta, 0.2, 0.28, t, level, 8)
        got = [f(loss), f(met["kl"]), f(met["clip_ratio/low_mean"]), f(met["clip_ratio/high_mean"]),
               f(met["clip_ratio/region_mean"])]
        np.testing.assert_allclose(got, exp, rtol=5e-5, atol=5e-6, err_msg=str((t, level, beta)))
        np.testing.assert_allclose(f(met["entropy"]), (ent * m).sum() / m.sum(), **TOL)


def test_grpo_hand_values_and_options():
    # one token per sequence, ρ = e^{±0.5}: A > 0 clipped high at 1.2, A < 0 clipped low at 0.8
    lp = np.array([[0.5], [-0.5], [0.5], [-0.5]])
    old = np.zeros((4, 1))
    adv = np.array([1.0, -1.0, -1.0, 1.0])
    m = np.ones((4, 1))
    J = jax.jit(functools.partial(L.grpo_loss, epsilon=0.2))
    loss, met = J(lp, old, adv, m)
    r = np.exp(0.5)
    per = [-1.2, 0.8, r, -1 / r]  # −min(ρA, clip(ρ)A)
    np.testing.assert_allclose(f(loss), np.mean(per), rtol=1e-6)
    assert f(met["clip_ratio/high_mean"]) == 0.25 and f(met["clip_ratio/low_mean"]) == 0.25
    assert f(met["clip_ratio/region_mean"]) == 0.5
    assert "kl" not in met and "entropy" not in met
    # dapo with num_items_in_batch, dr_grpo with the default max_completion_length = T
    lp, old, adv, m, ref, _ = _grpo_inputs(3)
    base = np_grpo(lp, old, adv, m, ref, 0.0, 0.2, 0.2, "bnpo", "token", T)[0]
    loss, _ = jax.jit(L.grpo_loss)(lp, old, adv, m, num_items_in_batch=2 * m.sum())
    np.testing.assert_allclose(f(loss), base / 2, **TOL)
    loss, _ = jax.jit(functools.partial(L.grpo_loss, loss_type="dr_grpo"))(lp, old, adv, m)
    np.testing.assert_allclose(f(loss), base * m.sum() / (B * T), **TOL)
    # token-level advantages [B, T] equal to broadcast [B] advantages give the same loss
    loss2, _ = jax.jit(L.grpo_loss)(lp, old, np.repeat(adv[:, None], T, 1), m)
    np.testing.assert_allclose(f(loss2), base, **TOL)
    with pytest.raises(ValueError, match="ref_token_logps"):
        L.grpo_loss(lp, old, adv, m, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        L.grpo_loss(lp, old, adv, m, loss_type="nope")


def test_grpo_extreme_and_empty_finite():
    lp, old, adv, m, ref, ent = _grpo_inputs(4)
    big = np.full((B, T), -1e4)
    z = np.zeros((B, T))
    for args in [(big, z, adv, m, z, ent), (z, big, -np.abs(adv), m, big, ent), (lp, old, adv, z, ref, ent)]:
        for (t, level, beta), (loss, met) in grpo_all(*args).items():
            assert np.isfinite(f(loss)) and all(np.isfinite(f(v)) for v in met.values()), (t, level, beta)


# ---------------------------------------------------------------------------------------------------- PPO
def np_gae_right_padded(r, v, lengths, gamma, lam):
    """TRL's loop with rewards and values zeroed after each sequence's length."""
    r = r * (np.arange(r.shape[1])[None] < lengths[:, None])
    v = v * (np.arange(r.shape[1])[None] < lengths[:, None])
    last = 0.0
    adv = np.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        nv = v[:, t + 1] if t < r.shape[1] - 1 else 0.0
        delta = r[:, t] + gamma * nv - v[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + v


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def gae_j(r, v, m, gamma, lam):
    return L.gae(r, v, m, gamma=gamma, lam=lam)


def test_gae_vs_numpy_and_masks():
    rng = np.random.default_rng(5)
    r, v = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    lengths = np.array([5, 3, 0, 1, 4, 2])
    m = (np.arange(T)[None] < lengths[:, None]).astype(float)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        adv, ret = gae_j(r, v, m, gamma, lam)
        ea, er = np_gae_right_padded(r, v, lengths, gamma, lam)
        np.testing.assert_allclose(np.asarray(adv), ea * m, **TOL)
        np.testing.assert_allclose(np.asarray(ret), er * m, **TOL)
    # interior masked tokens are transparent: same as the compressed sequence
    mi = np.ones((B, T))
    mi[:, 1] = 0
    mi[:, 3] = 0
    adv, ret = gae_j(r, v, mi, 0.9, 0.8)
    keep = [0, 2, 4]
    ea, er = np_gae_right_padded(r[:, keep], v[:, keep], np.full(B, 3), 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(adv)[:, keep], ea, **TOL)
    np.testing.assert_allclose(np.asarray(ret)[:, keep], er, **TOL)
    assert np.all(np.asarray(adv)[:, [1, 3]] == 0) and np.all(np.asarray(ret)[:, [1, 3]] == 0)


def test_masked_whiten_vs_numpy():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(B, T)) * 3 + 1
    m = (rng.random((B, T)) < 0.6).astype(float)
    xs = x[m > 0]
    mu, var = xs.mean(), xs.var(ddof=1)
    for shift in (True, False):
        out = np.asarray(jax.jit(functools.partial(L.masked_whiten, shift_mean=shift))(x, m))
        exp = (x - mu) / np.sqrt(var + 1e-8) + (0 if shift else mu)
        np.testing.assert_allclose(out, np.where(m > 0, exp, 0), **TOL)
    one = np.zeros((B, T))
    one[2, 3] = 1
    for mm in (one, np.zeros((B, T))):  # TRL raises here; we stay finite
        assert np.all(np.isfinite(np.asarray(jax.jit(L.masked_whiten)(x, mm))))


def test_kl_penalized_rewards_hand():
    lp = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    ref = np.array([[-1.5, -1.0, -3.0], [-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]])
    m = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    score = np.array([2.0, -1.0, 7.0])
    out = np.asarray(jax.jit(functools.partial(L.kl_penalized_rewards, kl_coef=0.1))(score, lp, ref, m))
    exp = np.array([[-0.05, 0.1 + 2.0, 0.0], [-0.1, -0.1, -0.1 - 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(out, exp, rtol=1e-6, atol=1e-7)
    out = np.asarray(jax.jit(functools.partial(L.kl_penalized_rewards, kl_estimator="k3"))(score, lp, ref, m))
    lr = ref - lp
    k3 = (np.exp(lr) - 1) - lr
    exp = -0.05 * k3 * m
    exp[0, 1] += 2.0
    exp[1, 2] += -1.0
    np.testing.assert_allclose(out, exp, rtol=1e-6, atol=1e-7)


def test_ppo_losses_vs_numpy():
    rng = np.random.default_rng(7)
    lp, old = rng.normal(size=(B, T)) - 1, rng.normal(size=(B, T)) - 1
    adv = rng.normal(size=(B, T))
    m = (rng.random((B, T)) < 0.7).astype(float)
    loss, met = jax.jit(L.ppo_policy_loss)(lp, old, adv, m)
    ratio = np.exp(lp - old)
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
    mm = lambda x: (x * m).sum() / m.sum()  # noqa: E731
    np.testing.assert_allclose([f(loss), f(met["policy/approxkl"]), f(met["policy/clipfrac"])],
                               [mm(np.maximum(l1, l2)), 0.5 * mm((lp - old) ** 2), mm(l2 > l1)], **TOL)
    v, vo, R = rng.normal(size=(B, T)), rng.normal(size=(B, T)), rng.normal(size=(B, T))
    loss, met = jax.jit(functools.partial(L.ppo_value_loss, clip_value=0.3))(v, vo, R, m)
    e1, e2 = (v - R) ** 2, (np.clip(v, vo - 0.3, vo + 0.3) - R) ** 2
    np.testing.assert_allclose([f(loss), f(met["val/clipfrac"]), f(met["val/vpred"])],
                               [0.5 * mm(np.maximum(e1, e2)), mm(e2 > e1), mm(v)], **TOL)
    # empty mask and extreme log-probs stay finite
    for args in [(lp, old, adv, np.zeros((B, T))), (np.zeros((B, T)), np.full((B, T), -1e4), -np.abs(adv), m)]:
        loss, met = jax.jit(L.ppo_policy_loss)(*args)
        assert np.isfinite(f(loss)) and all(np.isfinite(f(x)) for x in met.values())
