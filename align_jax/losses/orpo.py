"""ORPO: monolithic preference optimization without a reference model (Hong et al. 2024)."""

from __future__ import annotations

import jax.numpy as jnp

from align_jax.losses.common import log1mexp, log_sigmoid, masked_count, masked_sum, safe_div, to_f32
from align_jax.losses.registry import register


@register("orpo")
def orpo_loss(chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask, *, beta=0.1, nll_mask=None,
              label_probs=None):
    """ORPO loss as in TRL `ORPOTrainer.odds_ratio_loss` + `get_batch_loss_metrics` (paper eqs. 4–7).

        c = Σ_t m^c_t·logπ(y^c_t) / max(Σ_t m^c_t, 1),   r likewise      (average per-token log-probs)
        log_odds = (c − r) − (log1mexp(c) − log1mexp(r))                  log odds(y_c) − log odds(y_r)
        L = NLL_chosen − mean_B(β·logσ(log_odds))
    NLL_chosen is the token mean of −logπ over `nll_mask` (default `chosen_mask`) across the whole batch (TRL's
    cross-entropy over the chosen labels). Note TRL's β multiplies the odds-ratio term (the paper's λ).
    With soft labels p (`label_probs`, not in TRL) the odds-ratio term is p·logσ(lo) + (1−p)·logσ(−lo).
    log1mexp clamps its argument to ≤ −1e-6 (see `common.log1mexp`), so a zero-length completion (c = 0) stays
    finite where TRL would give −inf.

    Args: *_token_logps [B, T] per-token log-probs; *_mask [B, T] 0/1 completion masks; label_probs [B].
    Metrics (TRL names): `nll_loss`, `log_odds_ratio` mean logσ(log_odds), `log_odds_chosen` mean log_odds,
      `rewards/chosen` mean β·c, `rewards/rejected` mean β·r, `rewards/accuracies` mean(β·c > β·r),
      `rewards/margins` mean β(c − r), `logps/chosen` mean c, `logps/rejected` mean r.
    """
    ct, rt = to_f32(chosen_token_logps), to_f32(rejected_token_logps)
    cm, rm = to_f32(chosen_mask), to_f32(rejected_mask)
    nm = cm if nll_mask is None else to_f32(nll_mask)
    c = safe_div(masked_sum(ct, cm, axis=-1), masked_count(cm, axis=-1))
    r = safe_div(masked_sum(rt, rm, axis=-1), masked_count(rm, axis=-1))
    nll = -safe_div(masked_sum(ct, nm), masked_count(nm))

    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = log_sigmoid(log_odds)
    if label_probs is None:
        or_term = ratio
    else:
        p = to_f32(label_probs)
        or_term = p * ratio + (1.0 - p) * log_sigmoid(-log_odds)
    loss = nll - jnp.mean(beta * or_term)

    wc, wr = beta * c, beta * r
    metrics = {
        "nll_loss": nll,
        "log_odds_ratio": jnp.mean(ratio),
        "log_odds_chosen": jnp.mean(log_odds),
        "rewards/chosen": jnp.mean(wc),
        "rewards/rejected": jnp.mean(wr),
        "rewards/accuracies": jnp.mean((wc > wr).astype(jnp.float32)),
        "rewards/margins": jnp.mean(wc - wr),
        "logps/chosen": jnp.mean(c),
        "logps/rejected": jnp.mean(r),
    }
    return loss, metrics
