"""Reference-free preference losses: SimPO (Meng et al. 2024) and CPO (Xu et al. 2024), as in TRL's CPOTrainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax.losses.common import soft_label_bt, to_f32
from align_jax.losses.registry import register


def _metrics(c, r, beta, nll):
    wc, wr = beta * c, beta * r
    m = {
        "rewards/chosen": jnp.mean(wc),
        "rewards/rejected": jnp.mean(wr),
        "rewards/accuracies": jnp.mean((wc > wr).astype(jnp.float32)),
        "rewards/margins": jnp.mean(wc - wr),
        "logps/chosen": jnp.mean(c),
        "logps/rejected": jnp.mean(r),
    }
    if nll is not None:
        m["nll_loss"] = nll
    return m


def _nll_term(cpo_alpha, chosen_nll):
    if chosen_nll is None:
        if isinstance(cpo_alpha, (int, float)) and cpo_alpha == 0:
            return None, 0.0
        raise ValueError("cpo_alpha != 0 needs chosen_nll (token-mean NLL of the chosen completions)")
    nll = to_f32(chosen_nll)
    return nll, cpo_alpha * nll


@register("simpo")
def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.0,
               cpo_alpha=0.0, chosen_nll=None, label_probs=None):
    """SimPO (Meng et al. 2024, eq. 6), reference-free on average per-token log-probs c, r:

        γ = β·gamma_beta_ratio,   ℓ = −(1−ε)·logσ(β(c − r) − γ) − ε·logσ(−(β(c − r) − γ))
        L = mean_B(ℓ) + cpo_alpha · chosen_nll                              (CPO-SimPO's BC term, optional)

    Parameterized like the SimPO reference code (β = 2.0, γ/β = 0.5 defaults). TRL's CPOTrainer with
    `loss_type="simpo"` uses `simpo_gamma` = γ directly (default 0.5, with β = 0.1) and cpo_alpha = 1.0: TRL's
    setting is `simpo_loss(..., beta=b, gamma_beta_ratio=simpo_gamma / b, cpo_alpha=a, chosen_nll=nll)`.
    Soft labels p (`label_probs`, not in TRL/SimPO) replace 1−ε by p' = (1−ε)p + ε(1−p).

    Metrics (TRL CPO names): `rewards/chosen` mean β·c, `rewards/rejected` mean β·r, `rewards/accuracies`,
      `rewards/margins`, `logps/chosen`, `logps/rejected`, and `nll_loss` when chosen_nll is given.
    """
    c, r = to_f32(chosen_avg_logps), to_f32(rejected_avg_logps)
    logits = beta * (c - r) - beta * gamma_beta_ratio
    pp = 1.0 if label_probs is None else to_f32(label_probs)
    p_eff = (1.0 - label_smoothing) * pp + label_smoothing * (1.0 - pp)
    nll, nll_term = _nll_term(cpo_alpha, chosen_nll)
    loss = jnp.mean(soft_label_bt(logits, p_eff)) + nll_term
    return loss, _metrics(c, r, beta, nll)


@register("cpo")
def cpo_loss(chosen_logps, rejected_logps, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5,
             cpo_alpha=1.0, chosen_nll=None):
    """CPO loss as in TRL `CPOTrainer.cpo_loss` + `get_batch_loss_metrics` (Xu et al. 2024, eq. 3), alpha = 0.

        x = c − r  (minus simpo_gamma/β for "simpo")
        sigmoid / simpo: −(1−ε)·logσ(βx) − ε·logσ(−βx);  hinge: relu(1 − βx);  ipo: (x − 1/(2β))²
        L = mean_B(ℓ) + cpo_alpha · chosen_nll
    As in TRL, c and r are summed log-probs for sigmoid/hinge and average log-probs for ipo/simpo (the caller
    passes the right ones). TRL's AlphaPO reward transform (`alpha != 0`) is not implemented.
    Metrics as `simpo_loss`.
    """
    c, r = to_f32(chosen_logps), to_f32(rejected_logps)
    x = c - r
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            x = x - simpo_gamma / beta
        per_pair = -(1.0 - eps) * jax.nn.log_sigmoid(beta * x) - eps * jax.nn.log_sigmoid(-beta * x)
    elif loss_type == "hinge":
        per_pair = jax.nn.relu(1.0 - beta * x)
    elif loss_type == "ipo":
        per_pair = (x - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; known: sigmoid, hinge, ipo, simpo")
    nll, nll_term = _nll_term(cpo_alpha, chosen_nll)
    loss = jnp.mean(per_pair) + nll_term
    return loss, _metrics(c, r, beta, nll)


for _t in ("sigmoid", "hinge", "ipo", "simpo"):
    register(f"cpo:{_t}", loss_type=_t)(cpo_loss)
