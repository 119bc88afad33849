"""Value tests for the pairwise / listwise losses against float64 numpy references of the formulas."""

import functools
import itertools

import jax
import numpy as np
import pytest

from align_jax import losses as L
from align_jax.losses import DPO_LOSS_TYPES

_CACHE = {}


def J(fn, **static):
    """jax.jit(partial(fn, **static)), cached: eager JAX compiles every op separately, which is much slower."""
    key = (fn, tuple(sorted(static.items())))
    if key not in _CACHE:
        _CACHE[key] = jax.jit(functools.partial(fn, **static))
    return _CACHE[key]


def sft_loss(*a, **k):
    return J(L.sft_loss)(*a, **k)


def reward_loss(*a, **k):
    return J(L.reward_loss)(*a, **k)


def ranking_loss(*a, **k):
    return J(L.ranking_loss)(*a, **k)


def listwise_dpo_loss(*a, **k):
    return J(L.listwise_dpo_loss)(*a, **k)


def orpo_loss(*a, **k):
    return J(L.orpo_loss)(*a, **k)


def simpo_loss(*a, **k):
    return J(L.simpo_loss)(*a, **k)


def log1mexp(x):
    return J(L.log1mexp)(x)


def dpo_loss(*a, loss_type="sigmoid", bco_delta=None, **k):
    """Static: loss_type, bco_delta if a string; everything else (beta, ε, arrays) is traced."""
    lt = loss_type if isinstance(loss_type, str) else tuple(loss_type)
    if isinstance(bco_delta, str):
        return J(L.dpo_loss, loss_type=lt, bco_delta=bco_delta)(*a, **k)
    return J(L.dpo_loss, loss_type=lt)(*a, bco_delta=bco_delta, **k)


def cpo_loss(*a, loss_type="sigmoid", **k):
    return J(L.cpo_loss, loss_type=loss_type)(*a, **k)

TOL = dict(rtol=2e-5, atol=2e-5)


def logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def sig(x):
    return np.exp(logsig(x))


def f(x):
    return float(x)


# ----------------------------------------------------------------------------------------------------- SFT
def test_sft_hand_values():
    lp = np.array([[-1.0, -2.0, -3.0], [-4.0, 0.0, -9.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    loss, m = sft_loss(lp, mask)
    assert f(loss) == pytest.approx(7.0 / 3.0, rel=1e-6)
    assert f(m["nll"]) == pytest.approx(7.0 / 3.0, rel=1e-6)
    assert f(m["num_tokens"]) == 3.0
    loss, m = sft_loss(lp, np.zeros_like(mask))
    assert f(loss) == 0.0 and f(m["num_tokens"]) == 0.0


# -------------------------------------------------------------------------------------------- reward / BT
def np_reward(rc, rr, margin=None, c=None, p=None):
    d = rc - rr - (0 if margin is None else margin)
    per = -logsig(d) if p is None else -(p * logsig(d) + (1 - p) * logsig(-d))
    loss = per.mean() + (0 if c is None else c * np.mean((rc + rr) ** 2))
    return loss, np.mean(rc > rr), np.mean(rc - rr), np.mean(np.concatenate([rc, rr]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reward_loss_vs_numpy(seed):
    rng = np.random.default_rng(seed)
    rc, rr = rng.normal(size=6) * 3, rng.normal(size=6) * 3
    rr[0] = rc[0]  # a tie counts as wrong (strict >)
    margin, p = rng.random(6), rng.random(6)
    for kw in [{}, {"margin": margin, "center_rewards_coefficient": 0.3 * seed, "label_probs": p}]:
        loss, m = reward_loss(rc, rr, **kw)
        ref = np_reward(rc, rr, kw.get("margin"), kw.get("center_rewards_coefficient"), kw.get("label_probs"))
        np.testing.assert_allclose(f(loss), ref[0], **TOL)
        np.testing.assert_allclose([f(m["accuracy"]), f(m["margin"]), f(m["reward_mean"])], ref[1:], **TOL)


def test_reward_loss_extreme_and_hand():
    loss, m = reward_loss(np.array([1e4, -1e4] * 3), np.array([-1e4, 1e4] * 3))
    np.testing.assert_allclose(f(loss), 1e4, rtol=1e-6)  # (0 + 2e4) / 2
    assert f(m["accuracy"]) == 0.5
    loss, _ = reward_loss(np.zeros(6), np.zeros(6))
    assert f(loss) == pytest.approx(np.log(2.0), rel=1e-6)


# ------------------------------------------------------------------------------------------ ranking (PL)
def np_pl(scores, ranks, mask):
    """Reference: each valid item i competes with itself and the valid items strictly worse than it."""
    out = []
    for s, rk, mk in zip(scores, ranks, mask):
        tot = 0.0
        for i in range(len(s)):
            if not mk[i]:
                continue
            comp = [j for j in range(len(s)) if j == i or (mk[j] and rk[j] > rk[i])]
            tot += -s[i] + np.log(np.sum(np.exp(np.array([s[j] for j in comp], np.float64))))
        out.append(tot)
    return np.mean(out)


def np_pl_perm(s, order):
    """Plackett–Luce NLL of a strict order (list of indices best→worst), straight from the product formula."""
    tot = 0.0
    for k in range(len(order)):
        rest = order[k:]
        tot += -s[order[k]] + np.log(np.sum(np.exp(s[rest])))
    return tot


def test_ranking_no_ties_is_plackett_luce():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(4, 4)) * 2
    ranks = np.array([[2, 0, 3, 1], [0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    loss, _ = ranking_loss(s, ranks, np.ones((4, 4)))
    ref = np.mean([np_pl_perm(s[b], list(np.argsort(ranks[b]))) for b in range(4)])
    np.testing.assert_allclose(f(loss), ref, **TOL)


def test_ranking_ties_masks_and_metrics():
    s = np.array([[2.0, 1.0, 0.5, 9.0], [0.3, -0.2, 4.0, 0.0], [1.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    ranks = np.array([[0, 0, 1, 5], [1, 0, 2, 0], [0, 0, 7, 7], [0, 3, 3, 3]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    loss, m = ranking_loss(s, ranks, mask)
    np.testing.assert_allclose(f(loss), np_pl(s, ranks, mask), **TOL)
    # hand value of group 0: items 0 and 1 tie at the top, each competes only with item 2
    g0 = (-2 + np.logaddexp(2, 0.5)) + (-1 + np.logaddexp(1, 0.5))
    g1 = (-(-0.2) + np.log(np.exp(-0.2) + np.exp(0.3) + np.exp(4.0))) + (-0.0 + np.log(1 + np.exp(0.3) + np.exp(4.0))) \
        + (-0.3 + np.logaddexp(0.3, 4.0))
    np.testing.assert_allclose(f(loss), (g0 + g1 + 0 + 0) / 4, **TOL)  # K=2 tie and single item give 0
    # strictly ordered pairs: g0: (0,2) ok, (1,2) ok; g1: (1,0) wrong, (3,0) wrong, (0,2) wrong, (1,2) wrong,
    # (3,2) wrong -> 2 / 7
    np.testing.assert_allclose(f(m["accuracy"]), 2 / 7, **TOL)
    # top1 over groups with >= 2 valid: g0 top item 0 (rank 0) ok; g1 top item 2 (rank 2) wrong; g2 item 1 ok
    np.testing.assert_allclose(f(m["top1_accuracy"]), 2 / 3, **TOL)


def test_ranking_empty_and_extreme():
    s = np.array([[1e4, -1e4, 0, 0], [0.0, 0.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    loss, m = ranking_loss(s, np.array([[1, 0, 0, 0]] + [[0, 1, 2, 3]] * 3), np.array([[1, 1, 0, 0]] + [[0] * 4] * 3))
    np.testing.assert_allclose(f(loss), 2e4 / 4, rtol=1e-6)
    assert f(m["accuracy"]) == 0.0 and f(m["top1_accuracy"]) == 0.0
    loss, m = ranking_loss(s, np.zeros((4, 4), int), np.zeros((4, 4)))
    assert f(loss) == 0.0 and f(m["accuracy"]) == 0.0


# ----------------------------------------------------------------------------------------------------- DPO
def np_dpo(t, c, r, rc, rr, beta, eps, nc, nr, tau=0.05):
    cl, rl = c - rc, r - rr
    d = cl - rl
    if t == "sigmoid":
        return np.mean(-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d))
    if t == "hinge":
        return np.mean(np.maximum(0, 1 - beta * d))
    if t == "ipo":
        return np.mean((cl / np.maximum(nc, 1) - rl / np.maximum(nr, 1) - 1 / (2 * beta)) ** 2)
    if t == "robust":
        return np.mean((-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps))
    if t == "exo_pair":
        x = beta * d
        return np.mean(sig(x) * (logsig(x) - np.log(1 - eps)) + sig(-x) * (logsig(-x) - np.log(eps)))
    if t == "nca_pair":
        return np.mean(-logsig(beta * cl) - 0.5 * logsig(-beta * cl) - 0.5 * logsig(-beta * rl))
    if t == "bco_pair":
        return np.mean(-logsig(beta * cl) - logsig(-beta * rl))
    if t == "sppo_hard":
        return np.mean((cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2)
    if t == "apo_zero":
        return np.mean(1 - sig(beta * cl) + sig(beta * rl))
    if t == "apo_down":
        return np.mean(sig(beta * cl) + 1 - sig(beta * (cl - rl)))
    if t == "sigmoid_norm":
        return np.mean(-logsig(beta * (cl / np.maximum(nc, 1) - rl / np.maximum(nr, 1))))
    if t == "aot":
        dd = np.sort(c - r) - np.sort(rc - rr)
        return np.mean(-(1 - eps) * logsig(beta * dd) - eps * logsig(-beta * dd))
    if t == "aot_unpaired":
        dd = np.sort(cl) - np.sort(rl)
        return np.mean(-(1 - eps) * logsig(beta * dd) - eps * logsig(-beta * dd))
    if t == "discopop":
        x = beta * d
        mod = sig(x / tau)
        return np.mean(-logsig(x) * (1 - mod) + mod * np.exp(-x))
    raise AssertionError(t)


PAIR_TYPES = [t for t in DPO_LOSS_TYPES if t != "sft"]


def _dpo_inputs(seed, scale):
    rng = np.random.default_rng(seed)
    c, r, rc, rr = (rng.normal(size=5) * scale - 3 * scale for _ in range(4))  # B = 5 everywhere
    return c, r, rc, rr, rng.integers(0, 9, size=5), rng.integers(0, 9, size=5)


@jax.jit
def dpo_all(c, r, rc, rr, beta, eps, nc, nr):
    """Every pairwise DPO loss type in one compiled function (β, ε traced)."""
    return {t: L.dpo_loss(c, r, rc, rr, beta=beta, loss_type=t, label_smoothing=eps, chosen_lengths=nc,
                          rejected_lengths=nr) for t in PAIR_TYPES}


@pytest.mark.parametrize("seed,scale,beta,eps", [(0, 1.0, 0.1, 0.1), (1, 10.0, 0.5, 1e-3), (2, 3.0, 2.0, 0.3)])
def test_dpo_loss_types_vs_numpy(seed, scale, beta, eps):
    c, r, rc, rr, nc, nr = _dpo_inputs(seed, scale)
    out = dpo_all(c, r, rc, rr, beta, eps, nc, nr)
    cl, rl = c - rc, r - rr
    for t in PAIR_TYPES:
        loss, m = out[t]
        np.testing.assert_allclose(f(loss), np_dpo(t, c, r, rc, rr, beta, eps, nc, nr), rtol=5e-5, atol=2e-5,
                                   err_msg=t)
        np.testing.assert_allclose(
            [f(m[k]) for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                               "logps/chosen", "logps/rejected")],
            [np.mean(beta * cl), np.mean(beta * rl), np.mean(beta * cl > beta * rl), np.mean(beta * (cl - rl)),
             np.mean(c), np.mean(r)], rtol=1e-5, atol=1e-5)


def test_dpo_hand_values():
    z, one = np.zeros(5), np.ones(5, int)
    out = dpo_all(z, z, z, z, 0.1, 0.0, one, one)
    assert f(out["sigmoid"][0]) == pytest.approx(np.log(2.0), rel=1e-6)  # Δ = 0
    assert f(out["hinge"][0]) == pytest.approx(1.0, rel=1e-6)
    assert f(out["apo_zero"][0]) == pytest.approx(1.0, rel=1e-6)  # (1 - ½) + ½
    assert f(out["discopop"][0]) == pytest.approx(0.5 * np.log(2.0) + 0.5, rel=1e-6)  # m = ½ at βΔ = 0
    out = dpo_all(np.full(5, 5.0), z, z, z, 0.1, 0.0, one, one)
    assert f(out["hinge"][0]) == pytest.approx(0.5, rel=1e-6)  # βΔ = 0.5
    out = dpo_all(np.full(5, -2.0), np.full(5, -8.0), np.full(5, -4.0), np.full(5, -4.0), 0.5, 0.0,
                  np.full(5, 2), np.full(5, 4))
    assert f(out["ipo"][0]) == pytest.approx(((2.0 / 2 - (-4.0) / 4) - 1.0) ** 2, rel=1e-6)  # (2 - 1)^2 = 1
    out = dpo_all(np.full(5, 5.0), np.full(5, -5.0), z, z, 0.1, 0.0, one, one)
    assert f(out["sppo_hard"][0]) == 0.0  # cl = 1/(2β), rl = -1/(2β)


def test_dpo_cdpo_and_soft_labels():
    c, r, rc, rr, _, _ = _dpo_inputs(4, 5.0)
    d = 0.1 * ((c - rc) - (r - rr))
    loss, _ = dpo_loss(c, r, rc, rr, label_smoothing=0.2)
    np.testing.assert_allclose(f(loss), np.mean(-0.8 * logsig(d) - 0.2 * logsig(-d)), **TOL)
    p = np.array([1.0, 0.0, 0.5, 0.9, 0.3])
    loss, _ = dpo_loss(c, r, rc, rr, label_probs=p)
    np.testing.assert_allclose(f(loss), np.mean(-(p * logsig(d) + (1 - p) * logsig(-d))), **TOL)
    # label smoothing and soft labels compose: p' = (1-ε)p + ε(1-p)
    loss, _ = dpo_loss(c, r, rc, rr, label_probs=p, label_smoothing=0.1)
    pe = 0.9 * p + 0.1 * (1 - p)
    np.testing.assert_allclose(f(loss), np.mean(-(pe * logsig(d) + (1 - pe) * logsig(-d))), **TOL)
    # soft labels on a margin-only loss: p·ℓ(Δ) + (1−p)·ℓ(−Δ)
    loss, _ = dpo_loss(c, r, rc, rr, label_probs=p, loss_type="hinge")
    np.testing.assert_allclose(f(loss), np.mean(p * np.maximum(0, 1 - d) + (1 - p) * np.maximum(0, 1 + d)), **TOL)


@jax.jit
def dpo_soft_all(c, r, rc, rr, nc, nr, p):
    return {t: L.dpo_loss(c, r, rc, rr, beta=0.3, loss_type=t, label_smoothing=0.1, chosen_lengths=nc,
                          rejected_lengths=nr, label_probs=p)[0] for t in PAIR_TYPES}


def test_dpo_soft_labels_all_types_are_label_expectations():
    """label_probs p: p·ℓ(chosen ≻ rejected) + (1−p)·ℓ(rejected ≻ chosen), per pair, for every loss type."""
    c, r, rc, rr, nc, nr = _dpo_inputs(8, 4.0)
    p = np.array([1.0, 0.0, 0.5, 0.9, 0.3])
    out = dpo_soft_all(c, r, rc, rr, nc, nr, p)
    for t in PAIR_TYPES:
        if t in ("aot", "aot_unpaired"):  # batch-sorted: not per pair, check the two-term mixture with p const
            continue
        per = [p[i] * np_dpo(t, c[i:i + 1], r[i:i + 1], rc[i:i + 1], rr[i:i + 1], 0.3, 0.1, nc[i], nr[i])
               + (1 - p[i]) * np_dpo(t, r[i:i + 1], c[i:i + 1], rr[i:i + 1], rc[i:i + 1], 0.3, 0.1, nr[i], nc[i])
               for i in range(5)]
        np.testing.assert_allclose(f(out[t]), np.mean(per), rtol=5e-5, atol=2e-5, err_msg=t)
    out = dpo_soft_all(c, r, rc, rr, nc, nr, np.full(5, 0.25))
    for t in ("aot", "aot_unpaired"):
        exp = 0.25 * np_dpo(t, c, r, rc, rr, 0.3, 0.1, nc, nr) + 0.75 * np_dpo(t, r, c, rr, rc, 0.3, 0.1, nr, nc)
        np.testing.assert_allclose(f(out[t]), exp, rtol=5e-5, atol=2e-5, err_msg=t)
    out1 = dpo_soft_all(c, r, rc, rr, nc, nr, np.ones(5))
    hard = dpo_all(c, r, rc, rr, 0.3, 0.1, nc, nr)
    for t in PAIR_TYPES:
        np.testing.assert_allclose(f(out1[t]), f(hard[t][0]), rtol=1e-6, atol=1e-7, err_msg=t)


def test_dpo_multi_loss_bco_delta_sft_and_reference_free():
    c, r, rc, rr, nc, nr = _dpo_inputs(5, 2.0)
    loss, _ = dpo_loss(c, r, rc, rr, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                       chosen_nll=1.5)
    ref = 0.8 * np_dpo("sigmoid", c, r, rc, rr, 0.1, 0, nc, nr) + 0.2 * np_dpo("bco_pair", c, r, rc, rr, 0.1, 0, nc, nr)
    np.testing.assert_allclose(f(loss), ref + 1.5, **TOL)
    # bco_delta: explicit value and "batch" (mean of the 2B rewards)
    wc, wr = 0.1 * (c - rc), 0.1 * (r - rr)
    for delta in [0.7, "batch"]:
        dv = np.mean(np.concatenate([wc, wr])) if delta == "batch" else delta
        loss, _ = dpo_loss(c, r, rc, rr, loss_type="bco_pair", bco_delta=delta)
        np.testing.assert_allclose(f(loss), np.mean(-logsig(wc - dv) - logsig(-(wr - dv))), **TOL)
    # reference-free: zeros as reference
    loss, m = dpo_loss(c, r, np.zeros(5), np.zeros(5))
    np.testing.assert_allclose(f(loss), np.mean(-logsig(0.1 * (c - r))), **TOL)
    np.testing.assert_allclose(f(m["rewards/chosen"]), np.mean(0.1 * c), **TOL)


def test_dpo_extreme_logps_finite():
    big, z = np.full(5, -1e4), np.zeros(5)
    zl = np.zeros(5, int)  # zero-length completions
    for args in [(big, z, z, z), (z, big, z, z), (big, big, big, big), (z, z, big, z)]:
        out = dpo_all(*args, 0.1, 0.1, zl, zl)
        for t, (loss, m) in out.items():
            assert np.isfinite(f(loss)), (t, args)
            assert all(np.isfinite(f(v)) for v in m.values()), t


def test_dpo_errors():
    z = np.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, loss_type="exo_pair")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(z, z, z, z, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(z, z, z, z, loss_type="nope")
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(z, z, z, z, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(z, z, z, z, loss_type="sft")


def test_listwise_dpo_vs_numpy():
    rng = np.random.default_rng(6)
    lp, ref = rng.normal(size=(4, 4)) * 5 - 20, rng.normal(size=(4, 4)) * 5 - 20
    ranks = np.array([[0, 1, 2, 3], [3, 0, 0, 1], [1, 0, 2, 2], [0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    loss, m = listwise_dpo_loss(lp, ref, ranks, mask, beta=0.3)
    h = 0.3 * (lp - ref)
    np.testing.assert_allclose(f(loss), np_pl(h, ranks, mask), **TOL)
    np.testing.assert_allclose(f(m["rewards/mean"]), h[mask > 0].mean(), **TOL)
    np.testing.assert_allclose(f(m["logps/mean"]), lp[mask > 0].mean(), **TOL)
    pairs = [(b, i, j) for b in range(4) for i, j in itertools.permutations(range(4), 2)
             if mask[b, i] and mask[b, j] and ranks[b, i] < ranks[b, j]]
    np.testing.assert_allclose(f(m["rewards/accuracies"]), np.mean([h[b, i] > h[b, j] for b, i, j in pairs]), **TOL)
    np.testing.assert_allclose(f(m["rewards/margins"]), np.mean([h[b, i] - h[b, j] for b, i, j in pairs]), **TOL)


# ---------------------------------------------------------------------------------------------------- ORPO
def np_log1mexp(x):
    x = np.minimum(np.asarray(x, np.float64), -1e-6)
    return np.log(-np.expm1(x))


def test_log1mexp():
    x = np.array([-1e4, -50.0, -5.0, -0.7, -0.69, -1e-3, -1e-5])
    ref = np.where(x < -np.log(2), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))
    np.testing.assert_allclose(np.asarray(log1mexp(x)), ref, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(f(log1mexp(0.0)), np.log(1e-6), rtol=1e-4)  # clamped, finite


def np_orpo(ct, rt, cm, rm, beta, nm=None, p=None):
    c = (ct * cm).sum(1) / np.maximum(cm.sum(1), 1)
    r = (rt * rm).sum(1) / np.maximum(rm.sum(1), 1)
    nm = cm if nm is None else nm
    nll = -(ct * nm).sum() / max(nm.sum(), 1)
    lo = (c - r) - (np_log1mexp(c) - np_log1mexp(r))
    term = logsig(lo) if p is None else p * logsig(lo) + (1 - p) * logsig(-lo)
    return nll - np.mean(beta * term), nll, np.mean(logsig(lo)), np.mean(lo), c, r


@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_vs_numpy(seed):
    rng = np.random.default_rng(seed)
    ct, rt = -np.abs(rng.normal(size=(4, 6))) * (seed + 0.5), -np.abs(rng.normal(size=(4, 6))) * 2
    cm, rm = (rng.random((4, 6)) < 0.7).astype(float), (rng.random((4, 6)) < 0.7).astype(float)
    cm[0] = 0  # zero-length chosen completion
    nm = np.ones((4, 6))
    p = rng.random(4)
    for kw in [{}, {"nll_mask": nm, "label_probs": p}]:
        loss, m = orpo_loss(ct, rt, cm, rm, beta=0.2, **kw)
        ref, nll, lor, loc, c, r = np_orpo(ct, rt, cm, rm, 0.2, kw.get("nll_mask"), kw.get("label_probs"))
        np.testing.assert_allclose(f(loss), ref, rtol=5e-5, atol=5e-5)
        np.testing.assert_allclose([f(m["nll_loss"]), f(m["log_odds_ratio"]), f(m["log_odds_chosen"])],
                                   [nll, lor, loc], rtol=5e-5, atol=5e-5)
        np.testing.assert_allclose([f(m["rewards/chosen"]), f(m["rewards/rejected"]), f(m["rewards/margins"]),
                                    f(m["rewards/accuracies"])],
                                   [np.mean(0.2 * c), np.mean(0.2 * r), np.mean(0.2 * (c - r)), np.mean(c > r)],
                                   rtol=5e-5, atol=5e-5)


def test_orpo_extreme_and_empty_finite():
    ct, z = np.full((4, 6), -1e4), np.zeros((4, 6))
    loss, m = orpo_loss(ct, z, np.ones((4, 6)), z, beta=0.1)
    assert np.isfinite(f(loss)) and all(np.isfinite(f(v)) for v in m.values())
    loss, m = orpo_loss(ct, ct, z, z, beta=0.1)
    assert f(loss) == pytest.approx(-0.1 * np.log(0.5), rel=1e-5)  # both empty: log_odds 0, nll 0


# --------------------------------------------------------------------------------------------- SimPO / CPO
def test_simpo_and_cpo_vs_numpy():
    rng = np.random.default_rng(7)
    c, r = -np.abs(rng.normal(size=5)), -np.abs(rng.normal(size=5)) * 1.5
    loss, m = simpo_loss(c, r)
    np.testing.assert_allclose(f(loss), np.mean(-logsig(2.0 * (c - r) - 1.0)), **TOL)
    assert "nll_loss" not in m
    loss, m = simpo_loss(c, r, beta=2.5, gamma_beta_ratio=0.4, label_smoothing=0.1, cpo_alpha=0.05, chosen_nll=1.2)
    x = 2.5 * (c - r) - 1.0
    np.testing.assert_allclose(f(loss), np.mean(-0.9 * logsig(x) - 0.1 * logsig(-x)) + 0.05 * 1.2, **TOL)
    np.testing.assert_allclose([f(m["rewards/chosen"]), f(m["rewards/margins"]), f(m["nll_loss"])],
                               [np.mean(2.5 * c), np.mean(2.5 * (c - r)), 1.2], **TOL)
    refs = {
        "sigmoid": np.mean(-logsig(0.1 * (c - r))),
        "hinge": np.mean(np.maximum(0, 1 - 0.1 * (c - r))),
        "ipo": np.mean((c - r - 5.0) ** 2),
        "simpo": np.mean(-logsig(0.1 * (c - r) - 0.5)),
    }
    for t, ref in refs.items():
        loss, _ = cpo_loss(c, r, loss_type=t, chosen_nll=0.7)
        np.testing.assert_allclose(f(loss), ref + 0.7, **TOL)
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(c, r)


def test_ranking_hits_per_group_by_hand():
    """Group 0: ranks 0, 1, 1, 2 (a tie), scores order 2 of its 5 strictly ordered pairs right, top-scored item has
    rank 1 (not best); group 1: two valid items and a padded slot (rank -1, highest score, ignored)."""
    scores = np.array([[1.0, 3.0, 0.5, 2.0], [0.2, 0.1, 9.0, 0.0]], np.float32)
    ranks = np.array([[0, 1, 1, 2], [0, 1, -1, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    correct, pairs, top1, groups = (np.asarray(x) for x in jax.jit(L.ranking_hits)(scores, ranks, mask))
    # group 0 pairs (better, worse): (0,1) 1<3 no, (0,2) 1>0.5 yes, (0,3) 1<2 no, (1,3) 3>2 yes, (2,3) 0.5<2 no
    np.testing.assert_array_equal(correct, [2.0, 1.0])
    np.testing.assert_array_equal(pairs, [5.0, 1.0])
    np.testing.assert_array_equal(top1, [False, True])
    np.testing.assert_array_equal(groups, [True, True])
    metrics = L.ranking_loss(scores, ranks, mask)[1]  # pooled from the same counts: 3 of 6 pairs, 1 of 2 groups
    assert float(metrics["accuracy"]) == pytest.approx(0.5) and float(metrics["top1_accuracy"]) == pytest.approx(0.5)
