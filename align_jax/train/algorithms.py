"""Algorithms = a loss from `align_jax.losses` + the batch preparation that feeds it.

Each algorithm is a small record: which data kind it reads, whether it needs a frozen reference model or a
scalar head, its `loss(model, batch, ref_model, cfg) -> (loss, metrics)` (traced inside the jitted train step),
and `eval(model, batch, ref_model, cfg) -> {name: per-example [B] array}` (aggregated on the host with the
batch's `example_weight`, so padded eval rows never count). The training loop is shared by all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from align_jax import losses
from align_jax.models.heads import sequence_scores
from align_jax.ops import token_logps


def completion_token_logps(model, input_ids_BxT, attention_mask_BxT, completion_mask_BxT, *, chunk_size: int,
                           positions_BxT=None, segment_ids_BxT=None):
    """Per-token log-probs log π(y_t | y_<t, x) of tokens 1..T-1 and their loss mask, both [B, T-1].

    The mask is `completion_mask[:, 1:]` (a token counts when it is a completion token), and, for packed rows,
    0 where token t+1 starts a new segment (it is not predicted from its own example). Log-probs come from the
    vocabulary-chunked op, so [B, T, V] logits are never materialised."""
    h_BxTxD = model(input_ids_BxT, attention_mask_BxT, positions_BxT, segment_ids_BxT, return_hidden=True)
    logps = token_logps(h_BxTxD[:, :-1], model.lm_head_DxV(), input_ids_BxT[:, 1:], chunk_size=chunk_size)
    mask = completion_mask_BxT[:, 1:].astype(jnp.float32) * attention_mask_BxT[:, 1:].astype(jnp.float32)
    if segment_ids_BxT is not None:
        mask = mask * (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1])
    return logps, mask


def pair_token_logps(model, batch, chunk_size):
    """Chosen and rejected in one concatenated forward: returns (chosen, rejected) x (logps, mask) [B, T-1]."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    comp = jnp.concatenate([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    logps, mask = completion_token_logps(model, ids, attn, comp, chunk_size=chunk_size)
    B = batch["chosen_input_ids"].shape[0]
    return (logps[:B], mask[:B]), (logps[B:], mask[B:])


def seq_logps(logps, mask):
    return jnp.sum(logps * mask, axis=-1)


# ------------------------------------------------------------------------------------------------ SFT


def sft_loss(model, batch, ref_model, cfg):
    logps, mask = completion_token_logps(model, batch["input_ids"], batch["attention_mask"],
                                         batch["completion_mask"], chunk_size=cfg.chunk_size,
                                         positions_BxT=batch.get("positions"),
                                         segment_ids_BxT=batch.get("segment_ids"))
    mask = mask * batch["example_weight"][:, None]
    return losses.sft_loss(logps, mask)


def sft_eval(model, batch, ref_model, cfg):
    logps, mask = completion_token_logps(model, batch["input_ids"], batch["attention_mask"],
                                         batch["completion_mask"], chunk_size=cfg.chunk_size,
                                         positions_BxT=batch.get("positions"),
                                         segment_ids_BxT=batch.get("segment_ids"))
    return {"nll_sum": -seq_logps(logps, mask), "num_tokens": mask.sum(-1)}


# ------------------------------------------------------------------------------------------------ DPO


def _dpo_inputs(model, batch, ref_model, cfg):
    (c_lp, c_m), (r_lp, r_m) = pair_token_logps(model, batch, cfg.chunk_size)
    if "ref_chosen_logps" in batch:  # precomputed reference log-probs
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif ref_model is None:  # reference-free
        ref_c = ref_r = jnp.zeros(c_lp.shape[0], jnp.float32)
    else:
        (rc_lp, _), (rr_lp, _) = pair_token_logps(ref_model, batch, cfg.chunk_size)
        ref_c, ref_r = jax.lax.stop_gradient(seq_logps(rc_lp, c_m)), jax.lax.stop_gradient(seq_logps(rr_lp, r_m))
    c, r = seq_logps(c_lp, c_m), seq_logps(r_lp, r_m)
    if "policy_is_reference" in batch and (ref_model is not None or "ref_chosen_logps" in batch):
        # Before the first update the policy's weights are the reference's (setup.build_reference copies them):
        # the log-ratios are exactly 0, as in TRL. (XLA compiles the policy forward inside the gradient
        # differently from the reference's, which would leave ulp noise that decides `rewards/accuracies`.)
        same = batch["policy_is_reference"]
        ref_c = jnp.where(same, jax.lax.stop_gradient(c), ref_c)
        ref_r = jnp.where(same, jax.lax.stop_gradient(r), ref_r)
    return c, r, ref_c, ref_r, c_m.sum(-1), r_m.sum(-1)


def dpo_loss(model, batch, ref_model, cfg):
    c, r, ref_c, ref_r, n_c, n_r = _dpo_inputs(model, batch, ref_model, cfg)
    fn = losses.get_loss(cfg.loss.name)
    kw = {k: v for k, v in cfg.loss.kwargs.items()}
    if cfg.loss.get("use_soft_labels", True):
        kw["label_probs"] = batch["label_probs"]
    return fn(c, r, ref_c, ref_r, chosen_lengths=n_c, rejected_lengths=n_r, **kw)


def dpo_eval(model, batch, ref_model, cfg):
    """Per-pair eval quantities; `loss` is the configured loss (`cfg.loss.name`, its kwargs and the soft label) of
    each pair on its own (for the batch-coupled variants `aot`, `aot_unpaired` and `bco_delta="batch"`, the loss of
    a batch of that one pair)."""
    c, r, ref_c, ref_r, n_c, n_r = _dpo_inputs(model, batch, ref_model, cfg)
    beta = cfg.loss.kwargs.get("beta", 0.1)
    rc, rr = beta * (c - ref_c), beta * (r - ref_r)
    fn = losses.get_loss(cfg.loss.name)
    kw = dict(cfg.loss.kwargs)
    soft = cfg.loss.get("use_soft_labels", True)

    def one(c, r, ref_c, ref_r, n_c, n_r, p):
        extra = {"label_probs": p[None]} if soft else {}
        return fn(c[None], r[None], ref_c[None], ref_r[None], chosen_lengths=n_c[None], rejected_lengths=n_r[None],
                  **extra, **kw)[0]

    loss = jax.vmap(one)(c, r, ref_c, ref_r, n_c, n_r, batch["label_probs"])
    return {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
            "rewards/accuracies": (rc > rr).astype(jnp.float32), "logps/chosen": c, "logps/rejected": r,
            "loss": loss}


# ------------------------------------------------------------------------------------------------ ORPO


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


# ------------------------------------------------------------------------------------------- reward model


def _pair_rewards(model, batch):
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    s = sequence_scores(model, ids, attn)
    B = batch["chosen_input_ids"].shape[0]
    return s[:B], s[B:]


def _group_scores(model, batch):
    B, K, L = batch["input_ids"].shape
    s = sequence_scores(model, batch["input_ids"].reshape(B * K, L), batch["attention_mask"].reshape(B * K, L))
    return s.reshape(B, K)


def reward_loss(model, batch, ref_model, cfg):
    if "ranks" in batch:  # groupwise: Plackett-Luce
        mask = batch["group_mask"] * batch["example_weight"][:, None]
        return losses.ranking_loss(_group_scores(model, batch), batch["ranks"], mask)
    rc, rr = _pair_rewards(model, batch)
    kw = dict(cfg.loss.kwargs)
    if cfg.loss.get("use_soft_labels", True):
        kw["label_probs"] = batch["label_probs"]
    return losses.reward_loss(rc, rr, **kw)


def reward_eval(model, batch, ref_model, cfg):
    if "ranks" in batch:
        s = _group_scores(model, batch)
        best = jnp.argmax(jnp.where(batch["group_mask"] > 0, s, -jnp.inf), axis=-1)
        top1 = jnp.take_along_axis(batch["ranks"], best[:, None], axis=1)[:, 0] == batch["ranks"].min(-1)
        return {"top1_accuracy": top1.astype(jnp.float32)}
    rc, rr = _pair_rewards(model, batch)
    return {"accuracy": (rc > rr).astype(jnp.float32), "margin": rc - rr, "reward_mean": (rc + rr) / 2}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    data_kind: str  # what the data pipeline produces: 'sft' | 'pairwise' | 'groupwise' | 'prompt_only'
    loss: Callable
    eval: Callable
    needs_reference: bool = False
    scalar_head: bool = False
    loss_prefixes: tuple[str, ...] = ()  # loss registry names this algorithm accepts
    # Online algorithms: make_rollout(config=, graphdef=, rest=, ref=(graphdef, params, rest, shardings),
    # tokenizer=, mesh=, workdir=) -> rollout(params, next_batch: () -> loader batch, step) -> (batch, metrics).
    make_rollout: Callable | None = None
    validate: Callable | None = None  # extra config checks, run with validate_config before anything is built
    # build_model(config, mesh) -> the trainable module, when it is not the plain policy / scalar-head model
    # (PPO: policy + value model). Its `.policy`, if any, is what the reference copies, generation evaluates
    # and export writes.
    build_model: Callable | None = None


ALGORITHMS = {
    "sft": Algorithm("sft", "sft", sft_loss, sft_eval, loss_prefixes=("sft",)),
    "dpo": Algorithm("dpo", "pairwise", dpo_loss, dpo_eval, needs_reference=True, loss_prefixes=("dpo",)),
    "orpo": Algorithm("orpo", "pairwise", orpo_loss, orpo_eval, loss_prefixes=("orpo",)),
    "reward_model": Algorithm("reward_model", "pairwise", reward_loss, reward_eval, scalar_head=True,
                              loss_prefixes=("reward", "ranking")),
}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"config.algorithm={name!r}: unknown; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


from align_jax import rl as _rl  # noqa: E402,F401  (registers the online algorithms)
