"""ORPO (Hong et al. 2024): `losses.orpo_loss` on the chosen and rejected completions' token log-probs (one
concatenated forward), no reference model; soft labels (`label_probs`) when `loss.use_soft_labels`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax import losses
from align_jax.algorithms.base import Algorithm, register
from align_jax.models.logps import pair_token_logps, seq_logps


def orpo_loss(model, batch, ref_model, cfg):
    (c_lp, c_m), (r_lp, r_m) = pair_token_logps(model, batch, cfg.chunk_size)
    kw = dict(cfg.loss.kwargs)
    if cfg.loss.get("use_soft_labels", True):
        kw["label_probs"] = batch["label_probs"]
    return losses.get_loss(cfg.loss.name)(c_lp, r_lp, c_m, r_m, **kw)


def orpo_eval(model, batch, ref_model, cfg):
    """Per-pair eval quantities; `loss` is the configured ORPO loss of each pair on its own."""
    (c_lp, c_m), (r_lp, r_m) = pair_token_logps(model, batch, cfg.chunk_size)
    beta = cfg.loss.kwargs.get("beta", 0.1)
    c, r = seq_logps(c_lp, c_m) / jnp.maximum(c_m.sum(-1), 1), seq_logps(r_lp, r_m) / jnp.maximum(r_m.sum(-1), 1)
    fn, kw, soft = losses.get_loss(cfg.loss.name), dict(cfg.loss.kwargs), cfg.loss.get("use_soft_labels", True)

    def one(c_lp, r_lp, c_m, r_m, p):
        extra = {"label_probs": p[None]} if soft else {}
        return fn(c_lp[None], r_lp[None], c_m[None], r_m[None], **extra, **kw)[0]

    loss = jax.vmap(one)(c_lp, r_lp, c_m, r_m, batch["label_probs"])
    return {"rewards/chosen": beta * c, "rewards/rejected": beta * r, "rewards/margins": beta * (c - r),
            "rewards/accuracies": (c > r).astype(jnp.float32), "nll_loss": -c, "loss": loss}


ORPO = register(Algorithm("orpo", "pairwise", orpo_loss, orpo_eval, loss_prefixes=("orpo",), supports_packing=True,
                          filled_loss_args=("label_probs", "nll_mask")))
