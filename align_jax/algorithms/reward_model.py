"""Reward model: a decoder + scalar head trained on pairs with the Bradley-Terry loss (`losses.reward_loss`,
TRL `RewardTrainer`: margin, center_rewards_coefficient, soft labels) or on ranked groups with the
Plackett-Luce loss (`losses.ranking_loss`). Eval: pairwise accuracy, margin and mean reward; top-1 accuracy
on groups. Export: a `*ForSequenceClassification` directory (`train.model.export`)."""

from __future__ import annotations

import jax.numpy as jnp

from align_jax import losses
from align_jax.algorithms.base import Algorithm, register
from align_jax.models.heads import sequence_scores
from align_jax.models.logps import is_packed, last_token_places, unpack


def packed_scores(model, batch, token_index_NxL, attention_mask_NxL):
    """Scores [N] of the packed sequences: the head at each one's last token."""
    seg = batch["packed_segment_ids"]
    s_RxL = model(batch["packed_input_ids"], (seg > 0).astype(jnp.int32), batch["packed_positions"], seg)
    return unpack(s_RxL, last_token_places(token_index_NxL, attention_mask_NxL))


def pair_rewards(model, batch):
    """Scores of the chosen and rejected sequences ([B] each), one concatenated forward (packed or padded)."""
    if is_packed(batch):
        B = batch["label_probs"].shape[0]
        s = packed_scores(model, batch,
                          jnp.concatenate([batch["chosen_token_index"], batch["rejected_token_index"]]),
                          jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]))
        return s[:B], s[B:]
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    s = sequence_scores(model, ids, attn)
    B = batch["chosen_input_ids"].shape[0]
    return s[:B], s[B:]


def group_scores(model, batch):
    """Scores [B, K] of a groupwise batch [B, K, L]."""
    B, K, L = batch["attention_mask"].shape
    if is_packed(batch):
        return packed_scores(model, batch, batch["token_index"].reshape(B * K, L),
                             batch["attention_mask"].reshape(B * K, L)).reshape(B, K)
    s = sequence_scores(model, batch["input_ids"].reshape(B * K, L), batch["attention_mask"].reshape(B * K, L))
    return s.reshape(B, K)


def reward_loss(model, batch, ref_model, cfg):
    if "ranks" in batch:  # groupwise: Plackett-Luce
        mask = batch["group_mask"] * batch["example_weight"][:, None]
        return losses.ranking_loss(group_scores(model, batch), batch["ranks"], mask)
    rc, rr = pair_rewards(model, batch)
    kw = dict(cfg.loss.kwargs)
    if cfg.loss.get("use_soft_labels", True):
        kw["label_probs"] = batch["label_probs"]
    return losses.reward_loss(rc, rr, **kw)


def reward_eval(model, batch, ref_model, cfg):
    if "ranks" in batch:
        _, _, top1, _ = losses.ranking_hits(group_scores(model, batch), batch["ranks"], batch["group_mask"])
        return {"top1_accuracy": top1.astype(jnp.float32)}
    rc, rr = pair_rewards(model, batch)
    return {"accuracy": (rc > rr).astype(jnp.float32), "margin": rc - rr, "reward_mean": (rc + rr) / 2}


REWARD_MODEL = register(Algorithm("reward_model", "pairwise", reward_loss, reward_eval, scalar_head=True,
                                  supports_packing=True,
                                  loss_prefixes=("reward", "ranking"), filled_loss_args=("label_probs",)))
