"""DPO (Rafailov et al. 2023) and its variants (`losses.dpo_loss`: sigmoid, IPO, hinge, robust, cDPO via label
smoothing, BCO, AOT, SPPO, NCA, APO, DiscoPOP, ...; `loss.name` = "dpo:<loss_type>"), as TRL `DPOTrainer`:

    c = log π(y_w|x), r = log π(y_l|x) (sequence sums over completion tokens; one concatenated forward),
    the same for the frozen reference, live (a second forward, no gradient), precomputed once before training
    (`reference.precompute`: `precompute_reference`), or 0 (`loss.reference_free`).

Eval (per pair; TRL's metric names): rewards/chosen = β(c − c_ref), rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, and `loss` = the configured loss of each pair on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from align_jax import losses
from align_jax.algorithms import reference_cache
from align_jax.algorithms.base import Algorithm, register
from align_jax.errors import refuse
from align_jax.models.logps import pair_token_logps, seq_logps
from align_jax.parallel import host_batch, to_device

log = logging.getLogger(__name__)


def dpo_inputs(model, batch, ref_model, cfg):
    """(c, r, c_ref, r_ref, chosen lengths, rejected lengths), each [B]."""
    (c_lp, c_m), (r_lp, r_m) = pair_token_logps(model, batch, cfg.chunk_size)
    if "ref_chosen_logps" in batch:  # precomputed reference log-probs
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif ref_model is None:  # reference-free
        ref_c = ref_r = jnp.zeros(c_lp.shape[0], jnp.float32)
    else:
        ref_c, ref_r = jax.tree.map(jax.lax.stop_gradient, reference_logps(ref_model, batch, cfg.chunk_size))
    c, r = seq_logps(c_lp, c_m), seq_logps(r_lp, r_m)
    if "policy_is_reference" in batch and (ref_model is not None or "ref_chosen_logps" in batch):
        # Before the first update the policy's weights are the reference's (the reference is a copy of them):
        # the log-ratios are exactly 0, as in TRL. (XLA compiles the policy forward inside the gradient
        # differently from the reference's, which would leave ulp noise that decides `rewards/accuracies`.)
        same = batch["policy_is_reference"]
        ref_c = jnp.where(same, jax.lax.stop_gradient(c), ref_c)
        ref_r = jnp.where(same, jax.lax.stop_gradient(r), ref_r)
    return c, r, ref_c, ref_r, c_m.sum(-1), r_m.sum(-1)


def dpo_loss(model, batch, ref_model, cfg):
    c, r, ref_c, ref_r, n_c, n_r = dpo_inputs(model, batch, ref_model, cfg)
    fn = losses.get_loss(cfg.loss.name)
    kw = {k: v for k, v in cfg.loss.kwargs.items()}
    if cfg.loss.get("use_soft_labels", True):
        kw["label_probs"] = batch["label_probs"]
    return fn(c, r, ref_c, ref_r, chosen_lengths=n_c, rejected_lengths=n_r, **kw)


def dpo_eval(model, batch, ref_model, cfg):
    """Per-pair eval quantities; `loss` is the configured loss (`cfg.loss.name`, its kwargs and the soft label) of
    each pair on its own (for the batch-coupled variants `aot`, `aot_unpaired` and `bco_delta="batch"`, the loss of
    a batch of that one pair)."""
    c, r, ref_c, ref_r, n_c, n_r = dpo_inputs(model, batch, ref_model, cfg)
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


def reference_logps(ref_model, batch, chunk_size):
    """The reference's sequence log-probs (chosen [B], rejected [B]) of a padded or packed pair batch: what
    `precompute_reference` stores and a live reference gives in `dpo_inputs`."""
    (c_lp, c_m), (r_lp, r_m) = pair_token_logps(ref_model, batch, chunk_size)
    return seq_logps(c_lp, c_m), seq_logps(r_lp, r_m)


def precompute_reference(config, data, ref_model, mesh, tokenizer):
    """One pass over the training source (unshuffled) computes the reference sequence log-probs of every
    pair, keyed by record index; the training batches then carry them (`ref_chosen_logps`,
    `ref_rejected_logps`), so no reference forward runs during training. The values are those the live
    reference would give (same function, same masks)."""
    from align_jax.data import make_loader

    n = len(data.train_source)
    graphdef, params, rest = nnx.split(ref_model, nnx.Param, ...)
    use_cache = config.reference.get("cache", False) and data.data_dir and data.train_fingerprint
    if use_cache:
        key, desc = reference_cache.cache_key(
            data_fingerprint=data.train_fingerprint, tokenizer=tokenizer, model=ref_model, loader_kw=data.loader_kw,
            extra={"what": "dpo_pair_logps", "chunk_size": config.chunk_size,
                   "batch_size": config.eval_batch_size // jax.process_count()}, mesh=mesh)
        table = reference_cache.load(data.data_dir, key, (n, 2))
        if table is not None:
            log.info("reference log-probs of %d pairs: reused from %s", n,
                     os.path.join(data.data_dir, reference_cache.DIRNAME, key + ".npz"))
            return dataclasses.replace(data, train=data.train.map(_attacher(table)))
    t0 = time.perf_counter()
    table = np.full((n, 2), np.nan, np.float32)

    # Every process reads the same batches (not sharded by process): the global batch is P copies of them, and the
    # result is replicated so that each process can read it (its own block = the first one).
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def ref_logps(params, batch):
        return reference_logps(nnx.merge(graphdef, params, rest), batch, config.chunk_size)

    ds, _ = make_loader(data.train_source, tokenizer, batch_size=config.eval_batch_size // jax.process_count(),
                        seed=0, shuffle=False, num_epochs=1, drop_remainder=False, shard_by_process=False,
                        **data.loader_kw)
    for batch in ds:
        host = host_batch(batch)
        c, r = jax.device_get(ref_logps(params, to_device(host, mesh)))
        idx = host["record_index"]
        ok = idx >= 0
        table[idx[ok], 0], table[idx[ok], 1] = np.asarray(c)[:len(idx)][ok], np.asarray(r)[:len(idx)][ok]
    if use_cache:
        path = reference_cache.save(data.data_dir, key, table, desc)
        log.info("reference log-probs of %d pairs computed in %.1f s, kept in %s", n, time.perf_counter() - t0, path)
    return dataclasses.replace(data, train=data.train.map(_attacher(table)))


def _attacher(table):
    def attach(batch):  # the table's rows of this batch's records (padding rows: 0)
        idx = batch["record_index"]
        batch = dict(batch)
        batch["ref_chosen_logps"] = np.where(idx >= 0, table[np.maximum(idx, 0), 0], 0.0).astype(np.float32)
        batch["ref_rejected_logps"] = np.where(idx >= 0, table[np.maximum(idx, 0), 1], 0.0).astype(np.float32)
        return batch

    return attach


# dpo:* loss types where beta divides (1/(2 beta)); in every other dpo:* type beta = 0 makes the loss constant.
_BETA_DIVIDES = ("dpo:ipo", "dpo:sppo_hard")


def validate(config) -> None:
    """beta must be a finite number > 0 for the dpo:* losses (beta = 0 makes them constant or divides by 0)."""
    if not config.loss.name.startswith("dpo:"):
        return
    beta = config.loss.kwargs.get("beta", 0.1)  # dpo_loss's default
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not np.isfinite(beta) or beta < 0:
        refuse("loss.kwargs.beta", f"must be a finite number > 0, got {beta!r}")
    if beta == 0:
        why = ("divides by beta (its target margin is 1/(2*beta))" if config.loss.name in _BETA_DIVIDES else
               "multiplies every log-ratio by beta, so the loss is constant and no gradient flows")
        refuse("loss.kwargs.beta", f"beta=0 cannot train with {config.loss.name}: the loss {why}; use beta > 0 "
                                   f"(TRL's default is 0.1)")


DPO = register(Algorithm("dpo", "pairwise", dpo_loss, dpo_eval, needs_reference=True, supports_packing=True,
                         loss_prefixes=("dpo",),
                         filled_loss_args=("label_probs", "chosen_lengths", "rejected_lengths"), validate=validate,
                         precompute_reference=precompute_reference))
