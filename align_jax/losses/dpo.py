"""Direct Preference Optimization and its variants, as in TRL 1.x `DPOTrainer._compute_loss`.

Notation (all per pair, [B]):  cl = logπ(y_c) − logπ_ref(y_c),  rl = logπ(y_r) − logπ_ref(y_r),  Δ = cl − rl.
Sequence log-probs are sums of per-token log-probs over completion tokens. Reference-free training is
`ref_* = 0`. Also Plackett–Luce listwise DPO (`listwise_dpo_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax.losses.common import is_static_number, log_sigmoid, soft_label_bt, to_f32
from align_jax.losses.registry import register
from align_jax.losses.reward import plackett_luce_nll, ranking_metrics

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "sigmoid_norm", "aot", "aot_unpaired", "discopop", "sft",
)


def _per_pair_loss(loss_type, c, r, rc, rr, n_c, n_r, *, beta, label_smoothing, discopop_tau, bco_delta, chosen_nll):
    """Per-pair loss [B] of one DPO `loss_type` with y_c ≻ y_r (TRL 1.x formulas; see `dpo_loss`)."""
    cl, rl = c - rc, r - rr
    eps = label_smoothing
    delta = cl - rl
    if loss_type == "sigmoid":
        # cDPO: −(1−ε)logσ(βΔ) − ε·logσ(−βΔ)  (ε = 0: DPO)
        return soft_label_bt(beta * delta, 1.0 - eps)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):
        if n_c is None or n_r is None:
            raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths (completion token "
                             "counts; TRL always normalizes by them). Pass ones for the unnormalized form.")
        d = cl / jnp.maximum(n_c, 1.0) - rl / jnp.maximum(n_r, 1.0)
        if loss_type == "ipo":
            return (d - 1.0 / (2.0 * beta)) ** 2
        return -log_sigmoid(beta * d)
    if loss_type == "robust":
        return (-(1.0 - eps) * log_sigmoid(beta * delta) + eps * log_sigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
    if loss_type == "exo_pair":
        x = beta * delta
        return (jax.nn.sigmoid(x) * (log_sigmoid(x) - jnp.log1p(-eps))
                + jax.nn.sigmoid(-x) * (log_sigmoid(-x) - jnp.log(eps)))
    if loss_type == "nca_pair":
        wc, wr = beta * cl, beta * rl
        return -log_sigmoid(wc) - 0.5 * log_sigmoid(-wc) - 0.5 * log_sigmoid(-wr)
    if loss_type == "bco_pair":
        wc, wr = beta * cl, beta * rl
        if bco_delta is None:
            d0 = 0.0
        elif isinstance(bco_delta, str):
            if bco_delta != "batch":
                raise ValueError(f"bco_delta must be None, a number/array or 'batch', got {bco_delta!r}")
            d0 = jax.lax.stop_gradient(0.5 * (jnp.mean(wc) + jnp.mean(wr)))
        else:
            d0 = to_f32(bco_delta)
        return -log_sigmoid(wc - d0) - log_sigmoid(-(wr - d0))
    if loss_type == "sppo_hard":
        return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1.0 - jax.nn.sigmoid(beta * cl)) + jax.nn.sigmoid(beta * rl)
    if loss_type == "apo_down":
        return jax.nn.sigmoid(beta * cl) + (1.0 - jax.nn.sigmoid(beta * (cl - rl)))
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = jnp.sort(c - r) - jnp.sort(rc - rr)
        else:
            d = jnp.sort(cl) - jnp.sort(rl)
        return -(1.0 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
    if loss_type == "discopop":
        x = beta * delta
        m = jax.nn.sigmoid(x / discopop_tau)
        # m·exp(−x) computed as exp(logσ(x/τ) − x): finite for |x| large, where exp(−x) alone overflows.
        return -log_sigmoid(x) * (1.0 - m) + jnp.exp(log_sigmoid(x / discopop_tau) - x)
    if loss_type == "sft":
        if chosen_nll is None:
            raise ValueError("loss_type='sft' needs chosen_nll (token-mean NLL of the chosen completions)")
        return jnp.broadcast_to(to_f32(chosen_nll), cl.shape)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")


@register("dpo")
def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None, label_probs=None, loss_weights=None,
             discopop_tau=0.05, bco_delta=None, chosen_nll=None):
    """DPO family loss, per-pair formulas of TRL 1.x `DPOTrainer._compute_loss` (reverse-KL f-divergence).

    With cl, rl, Δ as in the module docstring, ε = `label_smoothing`, n_c / n_r = completion token counts
    (`chosen_lengths` / `rejected_lengths`, clamped to ≥ 1), per-pair losses ℓ:
      sigmoid       −logσ(βΔ)                                           DPO, Rafailov et al. 2023, eq. 7
                    with ε > 0: −(1−ε)logσ(βΔ) − ε·logσ(−βΔ)            cDPO (Mitchell 2023). TRL 1.x ignores ε for
                    `sigmoid` (older TRL applied it); we follow the issue spec, ε = 0 (default) matches TRL 1.x.
      hinge         relu(1 − βΔ)                                        SLiC, Zhao et al. 2023
      ipo           ((cl/n_c − rl/n_r) − 1/(2β))²                       IPO, Azar et al. 2023, eq. 17; the length
                    normalization is TRL's (confirmed by the IPO authors per TRL's comment)
      robust        [−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε)             rDPO, Chowdhury et al. 2024, eq. 6
      exo_pair      σ(βΔ)(logσ(βΔ) − log(1−ε)) + σ(−βΔ)(logσ(−βΔ) − log ε)   EXO, Ji et al. 2024, eq. 16 (needs ε > 0)
      nca_pair      −logσ(β·cl) − ½logσ(−β·cl) − ½logσ(−β·rl)           NCA, Chen et al. 2024
      bco_pair      −logσ(β·cl − δ) − logσ(−(β·rl − δ))                 BCO, Jung et al. 2024. TRL 1.x uses δ = 0
                    (older TRL used a running mean of the rewards). `bco_delta`: None → 0 (TRL 1.x, default), a
                    number/array, or "batch" → stop_gradient(mean of the 2B rewards β·cl, β·rl) of this batch.
      sppo_hard     (cl − 1/(2β))² + (rl + 1/(2β))²                     SPPO (hard labels), Wu et al. 2024, eq. 4.7
      apo_zero      (1 − σ(β·cl)) + σ(β·rl)                             APO-zero, D'Oosterlinck et al. 2024, eq. 7
      apo_down      σ(β·cl) + (1 − σ(β(cl − rl)))                       APO-down, eq. 8
      sigmoid_norm  −logσ(β(cl/n_c − rl/n_r))                           TRL's length-normalized DPO
      aot           −(1−ε)logσ(βd) − ε·logσ(−βd), d = sort_B(logπ_c − logπ_r) − sort_B(logπ_ref,c − logπ_ref,r)
      aot_unpaired  same with d = sort_B(cl) − sort_B(rl)               AOT, Melnyk et al. 2024 (sorts over batch)
      discopop      (1−m)·(−logσ(βΔ)) + m·exp(−βΔ), m = σ(βΔ/τ), τ = `discopop_tau` (0.05)   DiscoPOP, Lu et al.
                    2024, eq. 5; m·exp(−βΔ) is evaluated as exp(logσ(βΔ/τ) − βΔ) (same value, no overflow).
      sft           `chosen_nll` (the token-mean NLL of the chosen completions, given by the caller), as TRL's "sft".
    Soft labels `label_probs` p = P(y_c ≻ y_r) ∈ [0, 1] (per pair; not in TRL): the expected loss over the label,
    p·ℓ(y_c ≻ y_r) + (1−p)·ℓ(y_r ≻ y_c), i.e. ℓ evaluated with chosen and rejected (and their references and
    lengths) swapped. For `sigmoid` this is −(p'·logσ(βΔ) + (1−p')·logσ(−βΔ)) with p' = (1−ε)p + ε(1−p) (p' = p
    when ε = 0); for margin-only losses ℓ(Δ) it is p·ℓ(Δ) + (1−p)·ℓ(−Δ). p = 1 is the hard-label loss. The "sft"
    term is not affected by p.
    Loss = Σ_k w_k · mean_B(ℓ_k) over `loss_type` (a str or a list, TRL's multi-loss / MPO) with `loss_weights`
    (default all 1).

    Metrics (TRL names): `rewards/chosen` mean β·cl, `rewards/rejected` mean β·rl, `rewards/accuracies`
    mean(β·cl > β·rl), `rewards/margins` mean β(cl − rl), `logps/chosen`, `logps/rejected` (mean policy logps).
    Hyper-parameters (beta, label_smoothing, loss_type, ...) are Python values: bind them with functools.partial
    before `jax.jit`.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    if "exo_pair" in types and is_static_number(label_smoothing) and label_smoothing == 0.0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3), as in TRL")
    c, r = to_f32(chosen_logps), to_f32(rejected_logps)
    rc, rr = to_f32(ref_chosen_logps), to_f32(ref_rejected_logps)
    cl, rl = c - rc, r - rr
    n_c, n_r = to_f32(chosen_lengths), to_f32(rejected_lengths)
    p = to_f32(label_probs)
    hp = dict(beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau, bco_delta=bco_delta,
              chosen_nll=chosen_nll)

    loss = jnp.zeros((), jnp.float32)
    for t, w in zip(types, weights):
        per_pair = _per_pair_loss(t, c, r, rc, rr, n_c, n_r, **hp)
        if p is not None and t != "sft":
            per_pair = p * per_pair + (1.0 - p) * _per_pair_loss(t, r, c, rr, rc, n_r, n_c, **hp)
        loss = loss + w * jnp.mean(per_pair)

    wc, wr = beta * cl, beta * rl
    metrics = {
        "rewards/chosen": jnp.mean(wc),
        "rewards/rejected": jnp.mean(wr),
        "rewards/accuracies": jnp.mean((wc > wr).astype(jnp.float32)),
        "rewards/margins": jnp.mean(wc - wr),
        "logps/chosen": jnp.mean(c),
        "logps/rejected": jnp.mean(r),
    }
    return loss, metrics


for _t in DPO_LOSS_TYPES:
    if _t != "sft":
        register(f"dpo:{_t}", loss_type=_t)(dpo_loss)


@register("listwise_dpo")
def listwise_dpo_loss(logps, ref_logps, ranks, mask, *, beta=0.1):
    """DPO under the Plackett–Luce model over K ranked responses (Rafailov et al. 2023, appendix A.3):

        L = mean_b Σ_i [ −β·h_i + log Σ_{j ∈ C_i} exp(β·h_j) ],   h = logπ(y) − logπ_ref(y)

    i.e. `ranking_loss` on the implicit rewards β·h (ties: tied responses do not compete, see
    `align_jax.losses.reward.plackett_luce_nll`). With K = 2 and no tie this equals
    `dpo_loss(..., loss_type="sigmoid")`. Not in TRL.

    Args: logps, ref_logps [B, K] sequence log-probs; ranks [B, K] ints (0 = best, ties allowed); mask [B, K].
    Metrics: `rewards/accuracies` (pairwise ordering accuracy of β·h over strictly ordered valid pairs, pooled;
      equals DPO's with K = 2), `rewards/top1_accuracy`, `rewards/margins` (mean β(h_i − h_j) over strictly
      ordered pairs, i better), `rewards/mean` (mean β·h over valid items), `logps/mean`.
    """
    logps, ref_logps, mask = to_f32(logps), to_f32(ref_logps), to_f32(mask)
    ranks = jnp.asarray(ranks, jnp.int32)
    valid = mask > 0
    rewards = jnp.where(valid, beta * (logps - ref_logps), 0.0)
    loss = jnp.mean(plackett_luce_nll(rewards, ranks, mask))
    acc, top1, better, n_pairs = ranking_metrics(rewards, ranks, mask)
    diffs = jnp.where(better, rewards[:, :, None] - rewards[:, None, :], 0.0)
    n_valid = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {
        "rewards/accuracies": acc,
        "rewards/top1_accuracy": top1,
        "rewards/margins": jnp.sum(diffs) / jnp.maximum(n_pairs, 1.0),
        "rewards/mean": jnp.sum(rewards) / n_valid,
        "logps/mean": jnp.sum(jnp.where(valid, logps, 0.0)) / n_valid,
    }
    return loss, metrics
