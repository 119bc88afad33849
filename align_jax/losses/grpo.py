"""GRPO family: group-relative advantages and the clipped surrogate loss of TRL 1.x `GRPOTrainer`."""

from __future__ import annotations

import jax.numpy as jnp

from align_jax.losses.common import clamped_exp, is_static_number, masked_count, masked_sum, safe_div, to_f32
from align_jax.losses.registry import register

_SCALES = ("group", "batch", "none")


def _safe_sqrt(var):
    """sqrt with a finite (zero) gradient at 0, where jnp.sqrt's gradient is inf (→ NaN for equal rewards)."""
    pos = var > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)


def _std_ddof1(x, axis=None):
    """Unbiased std; 0 when there is a single element (TRL sets std = 0 for groups of one)."""
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis))
    return _safe_sqrt(jnp.var(x, axis=axis, ddof=1))


def grpo_advantages(rewards, group_size, *, scale_rewards="group"):
    """Group-relative advantages, TRL 1.x `GRPOTrainer._generate_and_score_completions` (Shao et al. 2024, §4.1.2).

        A_i = r_i − mean_{group(i)}(r)                          ("none", Dr. GRPO)
        A_i = (r_i − mean_{group(i)}(r)) / (std_{group(i)}(r) + 1e-4)   ("group", default)
        A_i = (r_i − mean_{group(i)}(r)) / (std_batch(r) + 1e-4)        ("batch", PPO-Lite)
    std is unbiased (ddof = 1); a group of one has std 0 (as TRL). Groups are consecutive runs of `group_size`
    (TRL's `rewards.view(-1, num_generations)`). Returns an array [N] (not a (loss, metrics) pair).
    """
    if scale_rewards not in _SCALES:
        raise ValueError(f"scale_rewards must be one of {_SCALES}, got {scale_rewards!r}")
    r = to_f32(rewards)
    g = r.reshape(-1, group_size)
    adv = (g - jnp.mean(g, axis=1, keepdims=True)).reshape(-1)
    if scale_rewards == "group":
        std = jnp.repeat(_std_ddof1(g, axis=1), group_size)
        adv = adv / (std + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (_std_ddof1(r) + 1e-4)
    return adv


def rank_advantages(ranks, mask, *, scale_rewards="group"):
    """Group-relative advantages from a ranked group (offline GRPO on annotated groups; not in TRL).

    Each valid item i of a group gets the Borda-style utility
        u_i = Σ_{j valid, j≠i} sign(rank_j − rank_i) / (n − 1)     ∈ [−1, 1]     (n = number of valid items)
    (+1 for each item it beats, −1 for each it loses to, 0 for ties), which depends only on the order of the
    ranks (0 = best), gives tied items equal advantage, and already has group mean 0. Then, as in
    `grpo_advantages`, `"group"` divides by (unbiased std over the valid items + 1e-4), `"batch"` by the unbiased
    std of all valid utilities + 1e-4, `"none"` leaves u. Groups with < 2 valid items and masked entries get 0.

    Args: ranks [B, K] ints, mask [B, K] 0/1. Returns an array [B, K] (flatten it for `grpo_loss`).
    """
    if scale_rewards not in _SCALES:
        raise ValueError(f"scale_rewards must be one of {_SCALES}, got {scale_rewards!r}")
    ranks = jnp.asarray(ranks, jnp.int32)
    m = to_f32(mask)
    valid = m > 0
    pair = (valid[:, :, None] & valid[:, None, :]).astype(jnp.float32)
    sgn = jnp.sign(ranks[:, None, :] - ranks[:, :, None]).astype(jnp.float32)  # [B, i, j]: +1 if j is worse
    n = jnp.sum(m, axis=1, keepdims=True)
    u = jnp.where(valid, jnp.sum(pair * sgn, axis=-1) / jnp.maximum(n - 1.0, 1.0), 0.0)
    if scale_rewards == "group":
        var = jnp.sum(m * u**2, axis=1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)  # mean u = 0 per group
        u = u / (_safe_sqrt(var) + 1e-4)
    elif scale_rewards == "batch":
        ntot = jnp.sum(m)
        mu = jnp.sum(m * u) / jnp.maximum(ntot, 1.0)
        var = jnp.sum(m * (u - mu) ** 2) / jnp.maximum(ntot - 1.0, 1.0)
        u = u / (_safe_sqrt(var) + 1e-4)
    return jnp.where(valid, u, 0.0)


_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


@register("grpo")
def grpo_loss(token_logps, old_token_logps, advantages, mask, *, ref_token_logps=None, beta=0.0, epsilon=0.2,
              epsilon_high=None, loss_type="dapo", importance_sampling_level="token", max_completion_length=None,
              token_entropy=None, num_items_in_batch=None):
    """Clipped-surrogate GRPO loss, TRL 1.x `GRPOTrainer._compute_loss` (GRPO: Shao et al. 2024, eq. 3).

        ρ_t = exp(logπ_t − logπ_old,t)                                     (token level)
        ρ   = exp(Σ_t m_t(logπ_t − logπ_old,t) / max(Σ_t m_t, 1))          (sequence level, GSPO, Zheng et al. 2025)
        ℓ_t = −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·KL_t,   KL_t = exp(ref_t − logπ_t) − (ref_t − logπ_t) − 1 (k3)
    aggregated by `loss_type`:
        grpo     mean_b [Σ_t m ℓ / max(Σ_t m, 1)]
        bnpo     Σ m ℓ / max(Σ m, 1)
        dapo     Σ m ℓ / max(N, 1), N = `num_items_in_batch` or Σ m (TRL divides by the token count of the whole
                 accumulated generation batch; for one batch that is Σ m, i.e. bnpo)        (DAPO, Yu et al. 2025)
        dr_grpo  Σ m ℓ / (B · max_completion_length), default max_completion_length = T    (Dr. GRPO, Liu et al. 2025)
    ε_high defaults to ε. The exponents of ρ and of the k3 term are clamped at +20 (`common.MAX_LOG_RATIO`) to keep
    extreme log-probs finite; below that the value is exact.

    Args: token_logps, old_token_logps, ref_token_logps, token_entropy, mask: [B, T]; advantages [B] or [B, T].
      beta, epsilon, epsilon_high may be traced; loss_type, importance_sampling_level, max_completion_length are
      Python values (static under jit).
    Metrics (TRL's definitions): `kl` masked token mean of KL_t (when ref_token_logps is given),
      `clip_ratio/low_mean` mean of (ρ < 1−ε and A < 0), `clip_ratio/high_mean` mean of (ρ > 1+ε_high and A > 0),
      `clip_ratio/region_mean` mean of their union — token-masked means at token level, means over sequences at
      sequence level (as TRL) — and `entropy` (masked token mean of token_entropy, when given).
    """
    if loss_type not in _GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; known: {', '.join(_GRPO_LOSS_TYPES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if ref_token_logps is None and not (is_static_number(beta) and beta == 0.0):
        raise ValueError("beta != 0 needs ref_token_logps")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    logp, old = to_f32(token_logps), to_f32(old_token_logps)
    m = to_f32(mask)
    valid = m > 0
    logp = jnp.where(valid, logp, 0.0)
    old = jnp.where(valid, old, 0.0)
    adv = to_f32(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]

    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = (safe_div(masked_sum(log_ratio, m, axis=-1), masked_count(m, axis=-1)))[:, None]
    coef_1 = clamped_exp(log_w)
    coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)

    metrics = {}
    if ref_token_logps is not None:
        ref = jnp.where(valid, to_f32(ref_token_logps), 0.0)
        d = ref - logp
        kl = clamped_exp(d) - d - 1.0
        metrics["kl"] = safe_div(masked_sum(kl, m), masked_count(m))
        per_token = per_token + beta * kl  # kl is finite, so β = 0 adds exactly 0 (β may be traced)
    per_token = jnp.broadcast_to(per_token, m.shape)

    total = masked_sum(per_token, m)
    if loss_type == "grpo":
        loss = jnp.mean(safe_div(masked_sum(per_token, m, axis=-1), masked_count(m, axis=-1)))
    elif loss_type == "bnpo":
        loss = safe_div(total, masked_count(m))
    elif loss_type == "dapo":
        denom = masked_count(m) if num_items_in_batch is None else to_f32(num_items_in_batch)
        loss = safe_div(total, denom)
    else:  # dr_grpo
        L = m.shape[1] if max_completion_length is None else max_completion_length
        loss = total / (m.shape[0] * L)

    low = ((coef_1 < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
    high = ((coef_1 > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    def gmean(x):  # TRL: one value per sequence when x is [B, 1] (sequence level), else masked token mean
        if importance_sampling_level == "sequence" and x.shape[1] == 1:
            return jnp.mean(x)
        return safe_div(masked_sum(x, m), masked_count(m))

    metrics["clip_ratio/low_mean"] = gmean(low)
    metrics["clip_ratio/high_mean"] = gmean(high)
    metrics["clip_ratio/region_mean"] = gmean(region)
    if token_entropy is not None:
        metrics["entropy"] = safe_div(masked_sum(to_f32(token_entropy), m), masked_count(m))
    return loss, metrics


for _t in _GRPO_LOSS_TYPES:
    register(f"grpo:{_t}", loss_type=_t)(grpo_loss)
register("grpo:gspo", importance_sampling_level="sequence")(grpo_loss)
