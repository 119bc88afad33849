"""Every loss under jax.jit, under an 8-device CPU mesh with the batch sharded, under jax.grad, with bf16 inputs,
and on edge cases (empty masks, zero-length completions, log-probs of -1e4).

Each case bundles several functions / variants into one compiled function to keep compile counts low.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import losses as L
from align_jax.losses.dpo import DPO_LOSS_TYPES

B, T, K = 8, 4, 4
PAIR_TYPES = [t for t in DPO_LOSS_TYPES if t != "sft"]
BIG = -1e4


def _lengths_mask(rng, edge, shape=(B, T)):
    m = (rng.random(shape) < 0.7).astype(np.float32)
    if edge:
        m[: shape[0] // 2] = 0  # empty masks / zero-length completions
    return m


# Each case: (fn(inputs) -> (objective, outputs), make(rng, edge) -> inputs, differentiable input names)
def case_sft(x):
    loss, m = L.sft_loss(x["lp"], x["m"])
    return loss, (loss, m)


def make_sft(rng, edge):
    lp = np.full((B, T), BIG, np.float32) if edge else -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    return {"lp": lp, "m": _lengths_mask(rng, edge)}


def case_reward(x):
    out = [L.reward_loss(x["rc"], x["rr"]),
           L.reward_loss(x["rc"], x["rr"], margin=x["margin"], center_rewards_coefficient=0.01, label_probs=x["p"])]
    return sum(o[0] for o in out), out


def make_reward(rng, edge):
    s = 1e4 if edge else 2.0
    return {"rc": (rng.normal(size=B) * s).astype(np.float32), "rr": (rng.normal(size=B) * s).astype(np.float32),
            "margin": rng.random(B).astype(np.float32), "p": rng.random(B).astype(np.float32)}


def case_ranking(x):
    out = [L.ranking_loss(x["s"], x["ranks"], x["m"]),
           L.listwise_dpo_loss(x["lp"], x["ref"], x["ranks"], x["m"], beta=0.1)]
    return sum(o[0] for o in out), out


def make_ranking(rng, edge):
    s = 1e4 if edge else 2.0
    m = np.ones((B, K), np.float32)
    m[1, 2:] = 0
    if edge:
        m[:3] = 0
        m[3, 1:] = 0
    ranks = rng.integers(0, 3, size=(B, K)).astype(np.int32)  # with ties
    lp = np.full((B, K), BIG, np.float32) if edge else (rng.normal(size=(B, K)) - 10).astype(np.float32)
    lp[:, 0] = 0.0
    return {"s": (rng.normal(size=(B, K)) * s).astype(np.float32), "ranks": ranks, "m": m, "lp": lp,
            "ref": (rng.normal(size=(B, K)) - 10).astype(np.float32)}


def case_dpo(x):
    args = (x["c"], x["r"], x["rc"], x["rr"])
    kw = dict(beta=0.1, label_smoothing=0.1, chosen_lengths=x["nc"], rejected_lengths=x["nr"])
    out = {t: L.dpo_loss(*args, loss_type=t, **kw) for t in PAIR_TYPES}
    out["multi"] = L.dpo_loss(*args, loss_type=["sigmoid", "bco_pair", "sft", "aot"], loss_weights=[0.8, 0.2, 1.0, 0.1],
                              label_probs=x["p"], chosen_nll=-jnp.mean(jnp.asarray(x["c"], jnp.float32)) / 10, **kw)
    out["bco_batch"] = L.dpo_loss(*args, loss_type="bco_pair", bco_delta="batch", label_probs=x["p"])
    out["nca_soft"] = L.dpo_loss(*args, loss_type="nca_pair", label_probs=x["p"])
    return sum(o[0] for o in out.values()), out


def case_simpo(x):
    nll = -jnp.mean(jnp.asarray(x["c"], jnp.float32))
    out = {"simpo": L.simpo_loss(x["c"], x["r"], cpo_alpha=0.1, chosen_nll=nll, label_probs=x["p"])}
    out.update({f"cpo:{t}": L.cpo_loss(x["c"], x["r"], loss_type=t, chosen_nll=nll)
                for t in ("sigmoid", "hinge", "ipo", "simpo")})
    return sum(o[0] for o in out.values()), out


def make_dpo(rng, edge):
    def v():
        if edge:
            return np.where(rng.random(B) < 0.5, BIG, 0.0).astype(np.float32)
        return (rng.normal(size=B) * 5 - 20).astype(np.float32)
    n = np.zeros(B, np.int32) if edge else rng.integers(1, 9, size=B).astype(np.int32)
    return {"c": v(), "r": v(), "rc": v(), "rr": v(), "nc": n, "nr": n[::-1].copy(),
            "p": rng.random(B).astype(np.float32)}


def case_orpo(x):
    out = [L.orpo_loss(x["ct"], x["rt"], x["cm"], x["rm"], beta=0.1),
           L.orpo_loss(x["ct"], x["rt"], x["cm"], x["rm"], beta=0.1, nll_mask=x["rm"], label_probs=x["p"])]
    return sum(o[0] for o in out), out


def make_orpo(rng, edge):
    ct = np.full((B, T), BIG, np.float32) if edge else -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    rt = np.zeros((B, T), np.float32) if edge else -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    return {"ct": ct, "rt": rt, "cm": _lengths_mask(rng, edge), "rm": _lengths_mask(rng, False),
            "p": rng.random(B).astype(np.float32)}


def case_grpo(x):
    out = {}  # every loss_type and both importance-sampling levels (all 8 combinations: tests/test_losses_rl.py)
    for t, level in [("grpo", "token"), ("bnpo", "sequence"), ("dapo", "token"), ("dr_grpo", "sequence")]:
        out[f"{t}/{level}"] = L.grpo_loss(x["lp"], x["old"], x["adv"], x["m"], ref_token_logps=x["ref"], beta=0.04,
                                          epsilon_high=0.28, loss_type=t, importance_sampling_level=level,
                                          token_entropy=x["ent"])
    adv = {s: L.grpo_advantages(x["rewards"], 4, scale_rewards=s) for s in ("group", "batch", "none")}
    radv = {s: L.rank_advantages(x["ranks"], x["rm"], scale_rewards=s) for s in ("group", "batch", "none")}
    obj = sum(o[0] for o in out.values()) + sum(jnp.sum(a * jnp.arange(a.size)) for a in adv.values())
    return obj, (out, adv, radv)


def make_grpo(rng, edge):
    lp = (rng.normal(size=(B, T)) - 2).astype(np.float32)
    old = (lp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    ref = (lp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    rewards = rng.normal(size=2 * B).astype(np.float32)
    if edge:
        lp[:] = 0.0
        old[:, :2] = BIG
        ref[:] = BIG
        rewards[:4] = 1.0
    rm = np.ones((B, K), np.float32)
    rm[0, 1:] = 0
    return {"lp": lp, "old": old, "ref": ref, "adv": rng.normal(size=B).astype(np.float32),
            "m": _lengths_mask(rng, edge), "ent": np.abs(rng.normal(size=(B, T))).astype(np.float32),
            "rewards": rewards, "ranks": rng.integers(0, 3, size=(B, K)).astype(np.int32), "rm": rm}


def case_ppo(x):
    rewards = L.kl_penalized_rewards(x["score"], x["lp"], x["ref"], x["m"], kl_coef=0.05)
    rewards_k3 = L.kl_penalized_rewards(x["score"], x["lp"], x["ref"], x["m"], kl_estimator="k3")
    adv, ret = L.gae(rewards, x["v"], x["m"], gamma=0.99, lam=0.95)
    white = L.masked_whiten(adv, x["m"])
    white_r = L.masked_whiten(rewards, x["m"], shift_mean=False)
    pol = L.ppo_policy_loss(x["lp"], x["old"], jax.lax.stop_gradient(white), x["m"])
    val = L.ppo_value_loss(x["v"], x["vo"], jax.lax.stop_gradient(ret), x["m"])
    obj = pol[0] + val[0] + jnp.sum(white_r) + jnp.sum(rewards_k3)
    return obj, (rewards, rewards_k3, adv, ret, white, white_r, pol, val)


def make_ppo(rng, edge):
    d = make_grpo(rng, edge)
    return {"lp": d["lp"], "old": d["old"], "ref": d["ref"], "m": d["m"],
            "score": rng.normal(size=B).astype(np.float32), "v": rng.normal(size=(B, T)).astype(np.float32),
            "vo": rng.normal(size=(B, T)).astype(np.float32)}


CASES = {
    "sft": (case_sft, make_sft, ["lp"]),
    "reward": (case_reward, make_reward, ["rc", "rr"]),
    "ranking": (case_ranking, make_ranking, ["s", "lp", "ref"]),
    "dpo": (case_dpo, make_dpo, ["c", "r", "rc", "rr"]),
    "simpo": (case_simpo, make_dpo, ["c", "r"]),
    "orpo": (case_orpo, make_orpo, ["ct", "rt"]),
    "grpo": (case_grpo, make_grpo, ["lp", "old", "ref", "rewards"]),
    "ppo": (case_ppo, make_ppo, ["lp", "v"]),
}


def _vg(fn, diff):
    def run(x):
        def obj(d):
            return fn({**x, **d})
        return jax.value_and_grad(obj, has_aux=True)({k: x[k] for k in diff})
    return jax.jit(run)


def _finite(tree):
    return all(bool(np.all(np.isfinite(np.asarray(a, np.float64)))) for a in jax.tree_util.tree_leaves(tree))


def _close(a, b, rtol, atol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("name", list(CASES))
def test_jit_sharded_grad_bf16_edges(name, mesh):
    """Two compiles per case: value-and-grad (fp32, unsharded) and forward on sharded bf16 inputs."""
    fn, make, diff = CASES[name]
    rng = np.random.default_rng(0)
    vg = _vg(fn, diff)
    x = make(rng, False)
    (obj, out), grads = vg(x)
    assert _finite(out) and _finite(obj) and _finite(grads)
    # edge cases: empty masks, zero-length completions, log-probs of -1e4: finite values and gradients
    (obj_e, out_e), grads_e = vg(make(rng, True))
    assert _finite(out_e) and _finite(obj_e), f"{name}: non-finite output on edge cases"
    assert _finite(grads_e), f"{name}: non-finite gradient on edge cases"
    # bf16 inputs, batch sharded over the 8-device mesh, give the fp32 unsharded answer on the bf16-rounded values
    # (a bf16 computation would be off by ~1e-2; sharding only reorders fp32 reductions)
    sh = NamedSharding(mesh, P("data"))
    xb = {k: (jnp.asarray(v, jnp.bfloat16) if v.dtype == np.float32 else v) for k, v in x.items()}
    xr = {k: (np.asarray(jnp.asarray(v, jnp.float32)) if v.dtype == jnp.bfloat16 else v) for k, v in xb.items()}
    xs = {k: jax.device_put(v, sh) for k, v in xb.items()}
    assert all(v.sharding == sh for v in xs.values())
    obj_s, out_s = jax.jit(fn)(xs)
    (obj_r, out_r), _ = vg(xr)
    _close((obj_s, out_s), (obj_r, out_r), rtol=2e-5, atol=2e-5)
    for leaf in jax.tree_util.tree_leaves(out_s):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_jit_matches_eager_sft():
    """jit gives the same numbers as op-by-op execution (checked on the cheapest case; eager compiles every op)."""
    fn, make, _ = CASES["sft"]
    x = make(np.random.default_rng(1), False)
    _close(jax.jit(fn)(x), fn(x), rtol=1e-6, atol=1e-6)
