"""PPO pieces for RLHF (Schulman et al. 2017; Ouyang et al. 2022), as in TRL's PPOTrainer (trl.experimental.ppo).

`gae`, `masked_whiten` and `kl_penalized_rewards` return arrays (not (loss, metrics) pairs); the two losses
return (loss, metrics). Masked (padding) positions are ignored everywhere and set to 0 in returned arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax.losses.common import clamped_exp, masked_count, masked_mean, masked_sum, safe_div, to_f32
from align_jax.losses.registry import register


def gae(token_rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) by a reverse `lax.scan` over tokens.

        δ_t = r_t + γ·V_{next(t)} − V_t,    A_t = δ_t + γλ·A_{next(t)},    R_t = A_t + V_t
    where next(t) is the next unmasked position after t (V_next = A_next = 0 past the last one): masked
    positions are transparent and get A = R = 0. For right-padded masks this is TRL's loop with values and
    rewards zeroed on padding. Defaults γ = 1, λ = 0.95 are TRL PPOConfig's.

    Args: token_rewards, values, mask: [B, T]. Returns (advantages [B, T], returns [B, T]).
    """
    r, v, m = to_f32(token_rewards), to_f32(values), to_f32(mask)
    valid = m > 0
    r = jnp.where(valid, r, 0.0)
    v = jnp.where(valid, v, 0.0)

    def step(carry, xs):
        next_v, next_a = carry
        r_t, v_t, ok = xs
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        a_t = jnp.where(ok, a_t, 0.0)
        carry = (jnp.where(ok, v_t, next_v), jnp.where(ok, a_t, next_a))
        return carry, a_t

    zeros = jnp.zeros(r.shape[0], jnp.float32)
    _, adv_TxB = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)
    adv = adv_TxB.T
    returns = jnp.where(valid, adv + v, 0.0)
    return adv, returns


def masked_whiten(x, mask, *, shift_mean=True):
    """TRL `masked_whiten`: (x − μ)·rsqrt(σ² + 1e-8) (+ μ if not shift_mean), μ, σ² the masked mean and unbiased
    (Bessel-corrected) variance over all unmasked entries. Masked entries are returned as 0 (TRL masked_fills them
    afterwards). Where TRL raises (≤ 1 unmasked entry) the Bessel factor is taken as 1 (no NaN). Returns an array."""
    x, m = to_f32(x), to_f32(mask)
    n = masked_count(m)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m) * (n / jnp.maximum(n - 1.0, 1.0))
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(m > 0, out, 0.0)


def kl_penalized_rewards(score, token_logps, ref_token_logps, mask, *, kl_coef=0.05, kl_estimator="k1"):
    """Per-token RLHF rewards (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2), as TRL PPOTrainer step 4:

        r_t = −kl_coef·KL_t  (+ score on the last unmasked token),   KL_t = logπ_t − logπ_ref,t ("k1", default)
                                                                      or (e^{ρ} − 1) − ρ, ρ = ref − logπ ("k3")
    The score goes on the last unmasked position of `mask`. TRL adds it one position after the last response
    token (its `sequence_lengths_p1`, the padded slot its value mask keeps): pass TRL's value mask and log-probs
    set to 0 beyond the response to get exactly that (the PPO trainer, `align_jax.algorithms.ppo.ppo_advantages`, does).
    A row with an empty mask gets no score. Masked entries are 0. Returns an array [B, T].
    """
    s, logp, ref, m = to_f32(score), to_f32(token_logps), to_f32(ref_token_logps), to_f32(mask)
    valid = m > 0
    logr = jnp.where(valid, ref - logp, 0.0)
    if kl_estimator == "k1":
        kl = -logr
    elif kl_estimator == "k3":
        kl = (clamped_exp(logr) - 1.0) - logr
    else:
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
    T = m.shape[1]
    pos = jnp.arange(T)[None, :]
    last = jnp.max(jnp.where(valid, pos, -1), axis=1, keepdims=True)
    rewards = -kl_coef * kl + jnp.where(pos == last, s[:, None], 0.0)
    return jnp.where(valid, rewards, 0.0)


@register("ppo:policy")
def ppo_policy_loss(token_logps, old_token_logps, advantages, mask, *, clip=0.2):
    """PPO clipped policy loss (Schulman et al. 2017, eq. 7), TRL PPOTrainer:

        ρ_t = exp(logπ_t − logπ_old,t),   L = masked_mean(max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−c, 1+c)))
    The exponent is clamped at +20 (`common.MAX_LOG_RATIO`), exact below.

    Args: token_logps, old_token_logps, advantages, mask: [B, T].
    Metrics: `policy/approxkl` ½·masked_mean((logπ − logπ_old)²) (TRL divides by all B·T entries, padding
      included, with padding diffs 0; we divide by the unmasked count), `policy/clipfrac` masked mean of
      (clipped loss > unclipped loss).
    """
    logp, old, adv, m = to_f32(token_logps), to_f32(old_token_logps), to_f32(advantages), to_f32(mask)
    valid = m > 0
    diff = jnp.where(valid, logp - old, 0.0)
    adv = jnp.where(valid, adv, 0.0)
    ratio = clamped_exp(diff)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(l1, l2), m)
    metrics = {
        "policy/approxkl": 0.5 * masked_mean(diff**2, m),
        "policy/clipfrac": masked_mean((l2 > l1).astype(jnp.float32), m),
    }
    return loss, metrics


@register("ppo:value")
def ppo_value_loss(values, old_values, returns, mask, *, clip_value=0.2):
    """Clipped value loss, TRL PPOTrainer:

        L = ½ · masked_mean(max((v − R)², (clip(v, v_old − c, v_old + c) − R)²))
    Args: values, old_values, returns, mask: [B, T].
    Metrics: `val/clipfrac` masked mean of (clipped error > unclipped error), `val/vpred` masked mean of v.
    """
    v, vo, R, m = to_f32(values), to_f32(old_values), to_f32(returns), to_f32(mask)
    valid = m > 0
    v, vo, R = (jnp.where(valid, a, 0.0) for a in (v, vo, R))
    vclip = jnp.clip(v, vo - clip_value, vo + clip_value)
    e1 = (v - R) ** 2
    e2 = (vclip - R) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(e1, e2), m)
    metrics = {
        "val/clipfrac": masked_mean((e2 > e1).astype(jnp.float32), m),
        "val/vpred": safe_div(masked_sum(v, m), masked_count(m)),
    }
    return loss, metrics
