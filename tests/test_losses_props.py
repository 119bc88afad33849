"""Property tests (hypothesis) and the loss registry."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from align_jax import losses as L
from align_jax.losses import registry

PROP = settings(max_examples=25, deadline=None)
B = 4


def floats(lo, hi):
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), allow_nan=False, allow_infinity=False, width=32)


def vec(lo=-100.0, hi=0.0, n=B):
    return hnp.arrays(np.float32, (n,), elements=floats(lo, hi))


dpo_j = jax.jit(L.dpo_loss, static_argnames=("loss_type",))
reward_j = jax.jit(L.reward_loss)
ranking_j = jax.jit(L.ranking_loss)
listwise_j = jax.jit(L.listwise_dpo_loss)


@PROP
@given(c=vec(), r=vec(), x=vec(-5.0, 5.0), beta=floats(0.01, 5.0))
def test_dpo_sigmoid_at_zero_margin_is_log2(c, r, x, beta):
    loss, m = dpo_j(c, r, c - x, r - x, beta=beta)
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-4)
    assert abs(float(m["rewards/margins"])) < 1e-3


@PROP
@given(c=vec(), r=vec(), rc=vec(), rr=vec(), beta=floats(0.01, 2.0))
def test_dpo_swap_flips_margin(c, r, rc, rr, beta):
    loss, m = dpo_j(c, r, rc, rr, beta=beta)
    loss_s, m_s = dpo_j(r, c, rr, rc, beta=beta)
    np.testing.assert_allclose(float(m_s["rewards/margins"]), -float(m["rewards/margins"]), rtol=1e-5, atol=1e-5)
    assert float(m_s["rewards/chosen"]) == float(m["rewards/rejected"])
    d = beta * ((c.astype(np.float64) - rc) - (r - rr))
    np.testing.assert_allclose(float(loss_s), np.mean(np.logaddexp(0, d)), rtol=1e-4, atol=1e-5)


@PROP
@given(d=floats(-30.0, 30.0), step=floats(0.5, 10.0), beta=floats(0.1, 1.0))
def test_dpo_loss_decreases_with_margin(d, step, beta):
    z = np.zeros(B, np.float32)
    for t, strict in [("sigmoid", True), ("robust", True), ("hinge", False)]:
        lo, _ = dpo_j(z + d, z, z, z, beta=beta, loss_type=t, label_smoothing=0.1 if t == "robust" else 0.0)
        hi, _ = dpo_j(z + d + step, z, z, z, beta=beta, loss_type=t, label_smoothing=0.1 if t == "robust" else 0.0)
        assert float(hi) < float(lo) if strict else float(hi) <= float(lo), t


@PROP
@given(s=hnp.arrays(np.float32, (B, 2), elements=floats(-50.0, 50.0)), first_best=hnp.arrays(np.bool_, (B,)))
def test_ranking_k2_equals_bradley_terry(s, first_best):
    ranks = np.where(first_best[:, None], [[0, 1]], [[1, 0]])
    loss, m = ranking_j(s, ranks, np.ones((B, 2)))
    best = np.where(first_best, s[:, 0], s[:, 1])
    worst = np.where(first_best, s[:, 1], s[:, 0])
    loss_bt, m_bt = reward_j(best, worst)
    np.testing.assert_allclose(float(loss), float(loss_bt), rtol=1e-5, atol=1e-6)
    assert float(m["accuracy"]) == float(m_bt["accuracy"])


@PROP
@given(lp=hnp.arrays(np.float32, (B, 2), elements=floats(-200.0, 0.0)),
       ref=hnp.arrays(np.float32, (B, 2), elements=floats(-200.0, 0.0)),
       first_best=hnp.arrays(np.bool_, (B,)), beta=floats(0.01, 1.0))
def test_listwise_dpo_k2_equals_dpo(lp, ref, first_best, beta):
    ranks = np.where(first_best[:, None], [[0, 1]], [[1, 0]])
    loss, m = listwise_j(lp, ref, ranks, np.ones((B, 2)), beta=beta)
    pick = lambda a, best: np.where(first_best == best, a[:, 0], a[:, 1])  # noqa: E731
    loss_d, m_d = dpo_j(pick(lp, True), pick(lp, False), pick(ref, True), pick(ref, False), beta=beta)
    np.testing.assert_allclose(float(loss), float(loss_d), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["rewards/margins"]), float(m_d["rewards/margins"]), rtol=1e-4, atol=1e-5)
    assert float(m["rewards/accuracies"]) == float(m_d["rewards/accuracies"])


adv_j = jax.jit(L.grpo_advantages, static_argnames=("group_size", "scale_rewards"))


@PROP
@given(r=vec(-10.0, 10.0, 12), const=floats(-10.0, 10.0), g=st.integers(0, 2),
       scale=st.sampled_from(["group", "batch", "none"]))
def test_grpo_equal_rewards_give_zero_advantage(r, const, g, scale):
    r = r.copy()
    r[4 * g: 4 * g + 4] = const
    adv = np.asarray(adv_j(r, group_size=4, scale_rewards=scale))
    np.testing.assert_array_equal(adv[4 * g: 4 * g + 4], 0.0)


gae_j = jax.jit(functools.partial(L.gae, gamma=1.0, lam=1.0))


@PROP
@given(r=hnp.arrays(np.float32, (B, 6), elements=floats(-10.0, 10.0)),
       v=hnp.arrays(np.float32, (B, 6), elements=floats(-10.0, 10.0)),
       lengths=hnp.arrays(np.int32, (B,), elements=st.integers(0, 6)))
def test_gae_lambda1_gamma1_is_reward_to_go_minus_value(r, v, lengths):
    m = (np.arange(6)[None] < lengths[:, None]).astype(np.float32)
    adv, ret = gae_j(r, v, m)
    rtg = np.cumsum((r * m)[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(np.asarray(adv), (rtg - v) * m, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ret), rtg * m, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------- registry
def test_registry():
    names = L.available()
    for n in ["sft", "reward", "ranking", "dpo", "dpo:sigmoid", "dpo:ipo", "dpo:discopop", "listwise_dpo", "orpo",
              "simpo", "cpo:simpo", "grpo", "grpo:dr_grpo", "grpo:gspo", "ppo:policy", "ppo:value"]:
        assert n in names
    fn = L.get_loss("dpo:ipo")
    assert isinstance(fn, functools.partial) and fn.func is L.dpo_loss and fn.keywords == {"loss_type": "ipo"}
    assert L.get_loss("grpo:gspo").keywords == {"importance_sampling_level": "sequence"}
    assert L.get_loss("sft") is L.sft_loss
    z = np.zeros(2, np.float32)
    np.testing.assert_allclose(float(L.get_loss("dpo:hinge")(z + 5, z, z, z)[0]), 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="dpo:sigmoid"):  # the message lists the known names
        L.get_loss("dpo:nope")
    with pytest.raises(ValueError, match="already registered"):
        L.register("dpo:sigmoid")(L.dpo_loss)
    try:
        L.register("test:double_beta_dpo", beta=0.2)(L.dpo_loss)
        assert "test:double_beta_dpo" in L.available()
        assert L.get_loss("test:double_beta_dpo").keywords == {"beta": 0.2}
    finally:
        registry._REGISTRY.pop("test:double_beta_dpo", None)
