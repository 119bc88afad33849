"""RLOO: REINFORCE Leave-One-Out advantages and the sequence-level clipped loss of TRL 1.x `RLOOTrainer`.

Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
LLMs" (arXiv 2402.14740). The KL to the reference policy is folded into the reward (`rloo_advantages(seq_kl=...)`),
not added to the loss; the whole completion is one action (one importance ratio per sequence).
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from align_jax.losses.common import clamped_exp, is_static_number, masked_count, masked_sum, safe_div, to_f32
from align_jax.losses.registry import register


def _unbiased_std(x):
    """Unbiased std of a 1-D array, 0 for a single element (torch gives NaN there), finite gradient at 0."""
    if x.size < 2:
        return jnp.zeros((), jnp.float32)
    var = jnp.var(x, ddof=1)
    pos = var > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)


def sequence_kl(old_token_logps, ref_token_logps, mask):
    """Per-sequence KL estimate of TRL's RLOO rollout (k1 estimator summed over the completion):

        kl_i = Σ_t (logπ_old,t − logπ_ref,t) · m_t

    Args: old_token_logps, ref_token_logps, mask: [N, T]. Returns [N] float32 (0 for an empty completion; masked
    entries are ignored even when inf/NaN). The `kl` TRL logs is Σ_i kl_i / max(Σ m, 1).
    """
    m = to_f32(mask)
    return masked_sum(to_f32(old_token_logps) - to_f32(ref_token_logps), m, axis=-1)


def rloo_advantages(rewards, group_size, *, seq_kl=None, beta=0.0, normalize_advantages=False):
    """Leave-one-out advantages, TRL 1.x `RLOOTrainer._generate_and_score_completions` (Ahmadian et al. 2024).

        r_i ← r_i − β · kl_i                                  (if β ≠ 0; kl_i from `sequence_kl`)
        b_i = (Σ_{j ∈ group(i)} r_j − r_i) / (G − 1)           (mean reward of the other G − 1 completions)
        A_i = r_i − b_i                                        (A = 0 when G = 1)
        A ← (A − mean(A)) / (std(A) + 1e-4)                    (if normalize_advantages; over the whole batch,
                                                                std unbiased; a batch of one has std 0)
    Groups are consecutive runs of G = `group_size` completions (TRL's `rewards.view(-1, num_generations)`).

    Args: rewards [N]; seq_kl [N] or None (needed when β ≠ 0); beta may be traced; group_size and
      normalize_advantages are Python values (static under jit). Returns an array [N] float32.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    group_size = int(group_size)
    r = to_f32(rewards).reshape(-1)
    if r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    if seq_kl is None:
        if not (is_static_number(beta) and beta == 0.0):
            raise ValueError("beta != 0 needs seq_kl")
    elif not (is_static_number(beta) and beta == 0.0):  # TRL skips the KL term entirely when beta == 0
        r = r - beta * to_f32(seq_kl).reshape(-1)
    if group_size == 1:
        adv = jnp.zeros_like(r)
    else:
        g = r.reshape(-1, group_size)
        baseline = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
        adv = (g - baseline).reshape(-1)
    if normalize_advantages:
        adv = (adv - jnp.mean(adv)) / (_unbiased_std(adv) + 1e-4)
    return adv


@register("rloo")
def rloo_loss(token_logps, old_token_logps, advantages, mask, *, epsilon=0.2, epsilon_high=None, token_entropy=None):
    """Sequence-level clipped REINFORCE loss, TRL 1.x `RLOOTrainer._compute_loss` (Ahmadian et al. 2024).

        logπ_i   = Σ_t m_t logπ_t,    logπ_old,i = Σ_t m_t logπ_old,t
        ρ_i      = exp(logπ_i − logπ_old,i)
        ℓ_i      = −min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε_high) A_i)
        loss     = mean_i ℓ_i
    ε_high defaults to ε. The exponent of ρ is clamped at +20 (`common.MAX_LOG_RATIO`) so extreme log-probs stay
    finite; below that the value is exact. An empty completion has ρ = 1 (and contributes −A_i, as in TRL).

    Args: token_logps, old_token_logps, token_entropy, mask: [B, T]; advantages [B] (from `rloo_advantages`).
      epsilon, epsilon_high may be traced.
    Metrics (TRL's definitions, means over sequences): `clip_ratio/low_mean` mean of (ρ < 1−ε and A < 0),
      `clip_ratio/high_mean` mean of (ρ > 1+ε_high and A > 0), `clip_ratio/region_mean` mean of their union, and
      `entropy` (masked token mean of token_entropy, when given).
    """
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    m = to_f32(mask)
    valid = m > 0
    logp = jnp.where(valid, to_f32(token_logps), 0.0)
    old = jnp.where(valid, to_f32(old_token_logps), 0.0)
    adv = to_f32(advantages)
    if adv.ndim != 1:
        raise ValueError(f"advantages must be [B] (one per sequence), got shape {adv.shape}")

    log_ratio = masked_sum(logp, m, axis=-1) - masked_sum(old, m, axis=-1)
    coef_1 = clamped_exp(log_ratio)
    coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
    per_seq = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    loss = jnp.mean(per_seq)

    low = (coef_1 < 1.0 - eps_low) & (adv < 0)
    high = (coef_1 > 1.0 + eps_high) & (adv > 0)
    metrics = {}
    if token_entropy is not None:
        metrics["entropy"] = safe_div(masked_sum(to_f32(token_entropy), m), masked_count(m))
    metrics["clip_ratio/low_mean"] = jnp.mean(low.astype(jnp.float32))
    metrics["clip_ratio/high_mean"] = jnp.mean(high.astype(jnp.float32))
    metrics["clip_ratio/region_mean"] = jnp.mean((low | high).astype(jnp.float32))
    return loss, metrics
