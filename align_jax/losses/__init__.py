"""align-jax loss library: one pure function per objective, arrays in, (loss, metrics) out.

Every function casts its inputs to float32, is jit- and grad-safe, and stays finite for empty masks,
zero-length completions and extreme log-probs. Names are registered in `registry` ("dpo:sigmoid", ...).
"""

from align_jax.losses.common import log1mexp, masked_mean, masked_sum, to_f32
from align_jax.losses.dpo import DPO_LOSS_TYPES, dpo_loss, listwise_dpo_loss
from align_jax.losses.grpo import grpo_advantages, grpo_loss, rank_advantages
from align_jax.losses.orpo import orpo_loss
from align_jax.losses.ppo import gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss, ppo_value_loss
from align_jax.losses.registry import available, get_loss, register
from align_jax.losses.reward import ranking_hits, ranking_loss, reward_loss
from align_jax.losses.rloo import rloo_advantages, rloo_loss, sequence_kl
from align_jax.losses.sft import sft_loss
from align_jax.losses.simpo import cpo_loss, simpo_loss

__all__ = [
    "DPO_LOSS_TYPES", "available", "cpo_loss", "dpo_loss", "gae", "get_loss", "grpo_advantages", "grpo_loss",
    "kl_penalized_rewards", "listwise_dpo_loss", "log1mexp", "masked_mean", "masked_sum", "masked_whiten",
    "orpo_loss", "ppo_policy_loss", "ppo_value_loss", "rank_advantages", "ranking_hits", "ranking_loss", "register",
    "reward_loss", "rloo_advantages", "rloo_loss", "sequence_kl", "sft_loss", "simpo_loss", "to_f32",
]
