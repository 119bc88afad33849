"""Listwise DPO: DPO under the Plackett–Luce model over K ranked responses (Rafailov et al. 2023, appendix A.3),
`losses.listwise_dpo_loss` on groupwise data (`data.kind = "groupwise"`, e.g. toy:groups_ranked):

    h_k = log π(y_k|x) − log π_ref(y_k|x)  (sequence sums over completion tokens; one forward over the B·K
    responses, padded or packed), the frozen reference live (a second forward, no gradient) or 0
    (`loss.reference_free`).

With K = 2 and no tie it is DPO's sigmoid loss on the same pairs (tests/test_listwise_dpo.py). Not in TRL.
Eval (per group): `loss` (the Plackett–Luce NLL of the group's implicit rewards β·h), `rewards/top1_accuracy`
(a best-ranked response has the highest implicit reward) and `rewards/accuracies` (the fraction of the group's
strictly ordered pairs that β·h orders correctly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax import losses
from align_jax.algorithms.base import Algorithm, register
from align_jax.losses.reward import plackett_luce_nll, ranking_hits
from align_jax.models.logps import group_token_logps, seq_logps


def listwise_inputs(model, batch, ref_model, cfg):
    """(log π [B, K], log π_ref [B, K] (0 when reference-free), mask of valid responses [B, K])."""
    B, K = batch["group_mask"].shape
    lp, m = group_token_logps(model, batch, cfg.chunk_size, False)
    logps = seq_logps(lp, m).reshape(B, K)
    if ref_model is None:
        ref = jnp.zeros_like(logps)
    else:
        rlp, _ = group_token_logps(ref_model, batch, cfg.chunk_size, False)
        ref = jax.lax.stop_gradient(seq_logps(rlp, m).reshape(B, K))
        if "policy_is_reference" in batch:  # before the first update π = π_ref exactly (as DPO, algorithms.dpo)
            ref = jnp.where(batch["policy_is_reference"], jax.lax.stop_gradient(logps), ref)
    return logps, ref, batch["group_mask"] * batch["example_weight"][:, None]


def listwise_dpo_loss(model, batch, ref_model, cfg):
    logps, ref, mask = listwise_inputs(model, batch, ref_model, cfg)
    return losses.get_loss(cfg.loss.name)(logps, ref, batch["ranks"], mask, **dict(cfg.loss.kwargs))


def listwise_dpo_eval(model, batch, ref_model, cfg):
    logps, ref, mask = listwise_inputs(model, batch, ref_model, cfg)
    rewards = jnp.where(mask > 0, cfg.loss.kwargs.get("beta", 0.1) * (logps - ref), 0.0)
    ranks = jnp.asarray(batch["ranks"], jnp.int32)
    right, pairs, top1, _ = ranking_hits(rewards, ranks, mask)
    return {"loss": plackett_luce_nll(rewards, ranks, mask),
            "rewards/top1_accuracy": top1.astype(jnp.float32),
            "rewards/accuracies": right / jnp.maximum(pairs, 1.0)}


LISTWISE_DPO = register(Algorithm("listwise_dpo", "groupwise", listwise_dpo_loss, listwise_dpo_eval,
                                  needs_reference=True, supports_packing=True, loss_prefixes=("listwise_dpo",)))
