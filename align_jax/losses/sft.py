"""Supervised fine-tuning loss."""

from __future__ import annotations

import jax.numpy as jnp

from align_jax.losses.common import masked_count, masked_sum, safe_div, to_f32
from align_jax.losses.registry import register


@register("sft")
def sft_loss(token_logps, mask):
    """Token-mean negative log-likelihood (TRL SFTTrainer's default, `average_tokens_across_devices` aside).

        L = −Σ_{b,t} m_{bt}·log p_{bt} / max(Σ_{b,t} m_{bt}, 1)

    Args:
      token_logps: [B, T] per-token log-probs of the target tokens.
      mask: [B, T] 0/1 loss mask (completion tokens). An empty mask gives loss 0.
    Returns:
      (loss, {"nll": loss, "num_tokens": Σ mask}).
    """
    token_logps = to_f32(token_logps)
    n = masked_count(mask)
    loss = -safe_div(masked_sum(token_logps, mask), n)
    return loss, {"nll": loss, "num_tokens": jnp.asarray(n, jnp.float32)}
