"""Reward-model losses: pairwise Bradley–Terry (TRL RewardTrainer) and listwise Plackett–Luce ranking."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax.losses.common import log_sigmoid, safe_div, soft_label_bt, to_f32
from align_jax.losses.registry import register


@register("reward")
def reward_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient=None, label_probs=None):
    """Bradley–Terry reward-model loss, as in TRL `RewardTrainer.compute_loss` (Ouyang et al. 2022, eq. 1).

        Δ = r_c − r_r − margin                                  (margin: Llama-2 paper, default 0)
        L = mean(−logσ(Δ)) + c·mean((r_c + r_r)²)               (c: `center_rewards_coefficient`, Eisenstein et al.)
    With soft labels p (`label_probs`, preference probability of "chosen ≻ rejected"; not in TRL):
        L = mean(−(p·logσ(Δ) + (1−p)·logσ(−Δ))) + c·mean((r_c + r_r)²)

    Args: chosen_rewards, rejected_rewards [B]; margin [B] or scalar; label_probs [B].
    Metrics: `accuracy` mean(r_c > r_r) (strict, margin not subtracted, as TRL), `margin` mean(r_c − r_r),
      `reward_mean` mean over all 2B rewards (TRL's `mean_reward`).
    """
    rc, rr = to_f32(chosen_rewards), to_f32(rejected_rewards)
    delta = rc - rr
    if margin is not None:
        delta = delta - to_f32(margin)
    if label_probs is None:
        per_pair = -log_sigmoid(delta)
    else:
        per_pair = soft_label_bt(delta, to_f32(label_probs))
    loss = jnp.mean(per_pair)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * jnp.mean((rc + rr) ** 2)
    metrics = {
        "accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
        "margin": jnp.mean(rc - rr),
        "reward_mean": 0.5 * (jnp.mean(rc) + jnp.mean(rr)),
    }
    return loss, metrics


def _pairwise_stats(scores, ranks, mask):
    """Pairs (i, j) of valid items with rank_i < rank_j ("i is strictly better"); returns (better_BxKxK, count)."""
    valid = mask > 0
    vv = valid[:, :, None] & valid[:, None, :]
    better = vv & (ranks[:, :, None] < ranks[:, None, :])
    return better, jnp.sum(better.astype(jnp.float32))


def plackett_luce_nll(scores, ranks, mask):
    """Per-group Plackett–Luce negative log-likelihood, [B].

        NLL_b = Σ_{i valid} [ −s_i + log Σ_{j ∈ C_i} exp(s_j) ],   C_i = {i} ∪ {j valid : rank_j > rank_i}

    Without ties, C_i = {j : rank_j ≥ rank_i}, the standard PL likelihood of the ranking (Plackett 1975; Luce
    1959). Ties: tied items do not compete with each other (a tied item is never in another's C_i), i.e. a tie
    block is a set of items each of which must beat every strictly worse item; the result is deterministic and
    independent of the tie's internal order. Items in the worst tier contribute 0. With K = 2 and no tie this
    is −logσ(s_best − s_worst); with a tie (or < 2 valid items) the group's loss is exactly 0 (no preference).
    """
    valid = mask > 0
    s = jnp.where(valid, scores, 0.0)
    worse = valid[:, None, :] & (ranks[:, None, :] > ranks[:, :, None])  # [B, i, j]: j strictly worse than i
    comp = worse | jnp.eye(s.shape[1], dtype=bool)[None]
    comp_f = comp.astype(jnp.float32)
    s_j = jnp.broadcast_to(s[:, None, :], comp.shape)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(comp, s_j, -jnp.inf), axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(comp_f * jnp.exp(jnp.where(comp, s_j - m, 0.0)), axis=-1)) + m[..., 0]
    per_item = jnp.where(valid, lse - s, 0.0)
    return jnp.sum(per_item, axis=-1)


def ranking_hits(scores, ranks, mask):
    """Per group [B]: (strictly ordered valid pairs the scores order correctly, such pairs, top-1 hit: the
    highest-scoring valid item has the best valid rank (ties at the top count as correct, a tie in scores goes to
    the first index), whether the group has >= 2 valid items). Padded slots (mask 0, any rank) take no part."""
    valid = mask > 0
    better, _ = _pairwise_stats(scores, ranks, mask)
    correct = jnp.sum((better & (scores[:, :, None] > scores[:, None, :])).astype(jnp.float32), axis=(1, 2))
    top = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    best_rank = jnp.min(jnp.where(valid, ranks, jnp.iinfo(jnp.int32).max), axis=-1)
    top1 = jnp.take_along_axis(ranks, top[:, None], axis=-1)[:, 0] == best_rank
    return correct, jnp.sum(better.astype(jnp.float32), axis=(1, 2)), top1, jnp.sum(valid, axis=-1) >= 2


def ranking_metrics(scores, ranks, mask):
    """Pairwise ordering accuracy over strictly ordered valid pairs (pooled over the batch) and top-1 accuracy
    (over groups with ≥ 2 valid items), from `ranking_hits`."""
    better, n_pairs = _pairwise_stats(scores, ranks, mask)
    correct, _, top1, groups = ranking_hits(scores, ranks, mask)
    acc = safe_div(jnp.sum(correct), n_pairs)
    groups = groups.astype(jnp.float32)
    top1 = safe_div(jnp.sum(groups * top1.astype(jnp.float32)), jnp.sum(groups))
    return acc, top1, better, n_pairs


@register("ranking")
def ranking_loss(scores, ranks, mask):
    """Listwise Plackett–Luce reward-model loss for groupwise ranked data (K responses per prompt).

        L = mean_b NLL_b,   NLL_b = Σ_i [ −s_i + log Σ_{j ∈ C_i} exp(s_j) ]     (see `plackett_luce_nll`)

    Equals `reward_loss` (Bradley–Terry) when K = 2. Ties: tied items do not compete (documented in
    `plackett_luce_nll`); a K = 2 tie gives loss 0 and zero gradient. Not in TRL (TRL is pairwise only).

    Args:
      scores: [B, K] reward-model scores. ranks: [B, K] ints, 0 = best, ties allowed. mask: [B, K] 0/1 for
        groups smaller than K (masked entries are ignored whatever their score/rank).
    Metrics: `accuracy` (fraction of strictly ordered valid pairs whose scores are in the right strict order,
      pooled over the batch), `top1_accuracy` (fraction of groups whose top-scored item has the best rank).
    """
    scores = to_f32(scores)
    ranks = jnp.asarray(ranks, jnp.int32)
    mask = to_f32(mask)
    loss = jnp.mean(plackett_luce_nll(scores, ranks, mask))
    acc, top1, _, _ = ranking_metrics(scores, ranks, mask)
    return loss, {"accuracy": acc, "top1_accuracy": top1}
