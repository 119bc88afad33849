"""PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022 "InstructGPT"), as TRL 1.x's
`PPOTrainer` (trl.experimental.ppo) computes it, on the shared training loop (rollout schedule, prompt bucket and
sample log from `align_jax.rl.rollout`).

Model: `PolicyValueModel` = the policy (a `Transformer`) + a value model, a scalar head either on its own
backbone (`ppo.value_model` = a reward-model export directory, "reward_model" = the one in `ppo.reward_model`,
TRL's usual set-up, or "policy" = a copy of the policy's backbone with a fresh head) or on the policy's own final
hidden states ("shared"). One optimizer updates both (TRL's `PolicyAndValueWrapper`). The frozen reference is a
copy of the initial policy; the frozen reward model (`ppo.reward_model`, an export of the reward-model trainer)
scores each rollout at its last token.

A rollout happens every K = `ppo.num_ppo_epochs` x `ppo.num_mini_batches` steps (TRL step numbers below):

  1. B = `batch_size` prompts, left-padded to P = `data.max_prompt_length`; one completion each, sampled from the
     current policy at temperature T (top-k/top-p off, as TRL), up to N = `ppo.response_length` tokens, stopping
     after EOS (TRL with `stop_token="eos"`); rng = fold_in(key(seed), step), so a resumed run draws the same;
  2. one jitted pass (`rollout_tensors`) over the R = B rows [P + N]: log π_old = log_softmax(logits / T)[y] of
     the policy, log π_ref of the reference (same T), old values V_t = v(h_{P-1+t}) (the value of the state
     before response token t), the reward-model score s at the last real token (EOS), and
       - `missing_eos_penalty`: s ← s − penalty when the completion has no EOS (TRL step 3);
       - policy mask m_t = 1 up to and including EOS; value mask m^v = m plus the slot right after EOS (TRL's
         `padding_mask_p1`: the value of the state that has seen EOS is trained to predict the score);
       - per-token rewards (`losses.kl_penalized_rewards`, TRL step 4): r_t = −kl_coef·KL_t on m, + s on the last
         slot of m^v (TRL's `actual_end`: EOS + 1, or the last slot when the completion fills all N);
         KL_t = log π_old − log π_ref ("k1", TRL's default) or the k3 estimator;
       - `whiten_rewards` (TRL step 5, off by default): masked_whiten(r, m^v, shift_mean=False);
       - GAE (`losses.gae`, γ = `gamma`, λ = `lam`) over m^v; returns R_t = A_t + V_t; advantages whitened over
         m (`losses.masked_whiten`, TRL step 6);
  3. K optimiser steps: for each of `num_ppo_epochs` epochs a fresh permutation of the R rows (seeded by
     (seed, rollout, epoch)), cut into `num_mini_batches` minibatches; each minibatch is one train step of
     `ppo_train_loss` = `losses.ppo_policy_loss` (clip `cliprange`, over m) + `vf_coef` · `losses.ppo_value_loss`
     (clip `cliprange_value`, over m^v), with the new log-probs at temperature T. (TRL's gradient accumulation
     within a minibatch is the loop's `optimizer.grad_accum_steps`.)

Checkpoints fall on rollout boundaries (`checkpoint.every_steps` a multiple of K, enforced): a resumed run
restarts with a fresh rollout from restored params, data iterator and step, bit-identical to one that never
stopped.

Logged with TRL's PPO metric names. Per rollout (repeated on its K steps): `objective/kl` = mean over rollouts of
Σ_t KL_t, `objective/entropy` = mean of Σ_t −log π_old over all N slots with TRL's fill value 1.0 for padded
log-probs (so it is Σ_m −log π_old − (N − length); TRL's definition, kept for comparability),
`objective/non_score_reward` = mean of Σ_t −kl_coef·KL_t, `objective/scores` = mean score (after the EOS penalty),
`objective/rlhf_reward` = the sum of the last two, `val/num_eos_tokens`, `episode`, `eps` (episodes of all processes
since this process's first rollout / its seconds since then, an int as TRL; measured after sampling, before the
rollout's updates), plus `completions/mean_length`, `completions/clipped_ratio`, `rollout_seconds`. Per step (one
minibatch; TRL averages the same quantities over the K updates of a rollout, i.e. the mean of our K steps):
`policy/approxkl_avg`, `policy/clipfrac_avg`, `loss/policy_avg`, `loss/value_avg`, `val/clipfrac_avg`,
`policy/entropy_avg`, `val/ratio`, and our own `val/vpred` and `val/ratio_token_var` (variance of the ratio over the
minibatch's tokens). TRL's `val/ratio_var` is the variance of the K per-update mean ratios of a rollout: compute it
from the logged `val/ratio` of those K steps. Differences in TRL's bookkeeping on padding: TRL takes approxkl, ratio
and entropy means over all B·N slots (padding included, with padded diffs 0); here those means are over the mask.

Differences from TRL, all deliberate: π_old is recomputed by a full forward after sampling (TRL takes it from
the generation-time scores); logits are divided by T (TRL by T + 1e-7); rewards and advantages are whitened
over the whole rollout (TRL per process; here, with several processes too, over every process's rows: the
rollout pass is one global computation, and the logged rollout metrics are means over all rows); masks come from
the sampler's stop-after-EOS mask, so EOS is always a real token (TRL builds masks from `!= pad_token_id`, which
drops EOS when pad == eos: the two agree exactly when the tokenizer's pad and EOS differ, as for the toy
tokenizer).

Several processes: each process samples and scores its own prompt rows inside one global computation
(`rl.rollout`); the rollout is then gathered to every process, so that `select` cuts the same global minibatch
as one process would, of which each process passes its own rows to the train step.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax import losses
from align_jax.algorithms.base import Algorithm, register
from align_jax.errors import refuse
from align_jax.losses.common import clamped_exp, masked_count, masked_mean, masked_sum, safe_div
from align_jax.models.build import build_policy, copy_module
from align_jax.models.heads import ScalarHeadModel, sequence_scores
from align_jax.models.llama import Transformer
from align_jax.models.logps import tempered_logps
from align_jax.parallel import to_device
from align_jax.rl.reward_model import load_reward_model
from align_jax.rl.rollout import (BlockRollout, SampleLog, batch_rows, first_rows, fixed_prompt_bucket, gather_rows,
                                  local_rows, log_due, prompt_str, validate_online)

log = logging.getLogger(__name__)

VALUE_MODELS = ("reward_model", "policy", "shared")  # or a path to a reward-model export


def validate_ppo_config(config) -> None:
    """Refuses a PPO config that cannot work, naming the key (ConfigValueError)."""
    if "ppo" not in config:
        refuse("ppo", "missing: start from configs/ppo.py")
    p = config.ppo
    for key in ("num_ppo_epochs", "num_mini_batches", "response_length"):
        if not isinstance(p[key], int) or p[key] < 1:
            refuse(f"ppo.{key}", f"must be a positive integer, got {p[key]!r}")
    if config.batch_size % p.num_mini_batches:
        refuse("ppo.num_mini_batches", f"{p.num_mini_batches} does not divide batch_size={config.batch_size} "
                                     "(the rollout's rows are cut into this many minibatches)")
    K = p.num_ppo_epochs * p.num_mini_batches
    if config.checkpoint.every_steps % K:
        refuse("checkpoint.every_steps", f"{config.checkpoint.every_steps} is not a multiple of num_ppo_epochs x "
                                       f"num_mini_batches = {K}: a checkpoint must fall on a rollout boundary")
    if not config.get("num_epochs", 0) and config.total_steps % K:
        refuse("total_steps", f"{config.total_steps} is not a multiple of num_ppo_epochs x num_mini_batches = {K}: a "
                            "run must end on a rollout boundary so that extending it later resumes exactly")
    if not p.temperature > 0:
        refuse("ppo.temperature", f"must be > 0, got {p.temperature!r}")
    if p.kl_estimator not in ("k1", "k3"):
        refuse("ppo.kl_estimator", f"must be 'k1' or 'k3', got {p.kl_estimator!r}")
    for key in ("cliprange", "cliprange_value", "vf_coef", "kl_coef"):
        if not p[key] >= 0:
            refuse(f"ppo.{key}", f"must be >= 0, got {p[key]!r}")
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        refuse("ppo.gamma", f"gamma={p.gamma!r} and lam={p.lam!r} must be in [0, 1]")
    if not p.reward_model or not os.path.isdir(p.reward_model):
        refuse("ppo.reward_model", f"{p.reward_model!r} is not a directory: give the export of a reward-model run "
                                 "(<workdir>/export of configs/reward_model.py)")
    if p.value_model not in VALUE_MODELS and not os.path.isdir(p.value_model):
        refuse("ppo.value_model", f"{p.value_model!r}: one of {VALUE_MODELS} or a reward-model export directory")
    if config.loss.get("reference_free", False):
        refuse("loss.reference_free", "PPO's KL penalty needs the reference model")
    validate_online(config, "PPO")


# ---------------------------------------------------------------------------------------------- the model


class PolicyValueModel(nnx.Module):
    """The policy plus a value model: `value` = a `ScalarHeadModel` with its own backbone, or None with
    `value_head` [D] applied to the policy's final hidden states (shared backbone)."""

    def __init__(self, policy: Transformer, value: ScalarHeadModel | None = None, value_head=None):
        self.policy = policy
        self.value = value
        self.value_head = None if value_head is None else nnx.Param(value_head, logical_axes=("embed",))

    def completion_hidden_and_values(self, input_ids_RxT, attention_mask_RxT, num_completion_tokens: int):
        """Policy hidden states h_{P-1+t} [R, N, D] (the states that predict completion token t) and the values
        V_t of the same states [R, N] (float32). Positions are cumsum(mask) − 1, as in the sampler."""
        N = num_completion_tokens
        # positions default to cumsum(mask) - 1 (`llama.default_positions`)
        h = self.policy(input_ids_RxT, attention_mask_RxT, return_hidden=True)[:, -N - 1:-1]
        if self.value is None:
            v = jnp.einsum("rnd,d->rn", h, self.value_head[...].astype(h.dtype), preferred_element_type=jnp.float32)
        else:
            v = self.value(input_ids_RxT, attention_mask_RxT)[:, -N - 1:-1]
        return h, v


def build_policy_value_model(config, mesh):
    """The trainable PPO model: the policy from `model.init_from` (straight into its shardings) and the value
    model per `ppo.value_model` (module docstring)."""
    policy = build_policy(config, mesh)
    how = config.ppo.value_model
    if how == "shared":
        D = policy.config.hidden_size
        std = 1.0 / (D + 1) ** 0.5  # transformers' init of a fresh score head
        head = (std * jax.random.normal(jax.random.key(config.seed + 1), (D,))).astype(policy.config.param_dtype)
        return PolicyValueModel(policy, None, head)
    if how == "policy":
        backbone = copy_module(policy)
        value = ScalarHeadModel(backbone.config, rngs=nnx.Rngs(config.seed + 1), backbone=backbone)
        return PolicyValueModel(policy, value)
    path = config.ppo.reward_model if how == "reward_model" else how
    value = load_reward_model(path, mesh=mesh, dtype=config.model.dtype)
    return PolicyValueModel(policy, value)


# ---------------------------------------------------------------------------------------------- rollout math


def ppo_advantages(scores_R, logps_RxN, ref_logps_RxN, values_RxN, completion_ids_RxN, completion_mask_RxN, *,
                   eos_id: int, kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                   whiten_rewards: bool = False, missing_eos_penalty=None):
    """TRL PPOTrainer steps 3-6 on one rollout (module docstring), jit-friendly. Returns a dict of arrays:
    `scores` [R] (after the EOS penalty), `value_mask` [R, N], `rewards`, `kl`, `advantages` (whitened, 0 off
    the policy mask), `returns`, `values` (0 off the value mask), all [R, N] float32."""
    m = completion_mask_RxN.astype(jnp.float32)
    N = m.shape[1]
    contain_eos = jnp.any((completion_ids_RxN == eos_id) & (m > 0), axis=1)
    scores = scores_R.astype(jnp.float32)
    if missing_eos_penalty is not None:
        scores = jnp.where(contain_eos, scores, scores - missing_eos_penalty)
    seq_len = jnp.sum(m, axis=1).astype(jnp.int32) - 1  # index of the last real token
    t = jnp.arange(N)[None, :]
    value_mask = jnp.where((m > 0) | (t == seq_len[:, None] + 1), 1.0, 0.0)
    logp = jnp.where(m > 0, logps_RxN, 0.0)
    ref = jnp.where(m > 0, ref_logps_RxN, 0.0)
    # r_t = −kl_coef·KL_t on m (0 at the extra value slot, where both log-probs are 0) + the score on the last
    # slot of the value mask.
    rewards = losses.kl_penalized_rewards(scores, logp, ref, value_mask, kl_coef=kl_coef, kl_estimator=kl_estimator)
    logr = ref - logp
    kl = jnp.where(m > 0, -logr if kl_estimator == "k1" else (clamped_exp(logr) - 1.0) - logr, 0.0)  # as the rewards
    if whiten_rewards:
        rewards = losses.masked_whiten(rewards, value_mask, shift_mean=False)
    values = jnp.where(value_mask > 0, values_RxN, 0.0)
    adv, returns = losses.gae(rewards, values, value_mask, gamma=gamma, lam=lam)
    adv = losses.masked_whiten(adv, m)
    return {"scores": scores, "value_mask": value_mask, "rewards": rewards, "kl": kl, "advantages": adv,
            "returns": returns, "values": values, "contain_eos": contain_eos.astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=("pv_graphdef", "ref_graphdef", "rm_graphdef", "N", "kw"))
def rollout_tensors(pv_params, pv_rest, ref_params, ref_rest, rm_params, rm_rest, ids_RxT, attn_RxT, comp_ids_RxN,
                    comp_mask_RxN, *, pv_graphdef, ref_graphdef, rm_graphdef, N: int, kw: tuple):
    """One pass over a rollout: log π_old, log π_ref, old values, reward-model scores, then `ppo_advantages`."""
    kw = dict(kw)
    T, chunk, eos = kw.pop("temperature"), kw.pop("chunk_size"), kw.pop("eos_id")
    pv = nnx.merge(pv_graphdef, pv_params, pv_rest)
    ref = nnx.merge(ref_graphdef, ref_params, ref_rest)
    rm = nnx.merge(rm_graphdef, rm_params, rm_rest)
    h, values = pv.completion_hidden_and_values(ids_RxT, attn_RxT, N)
    logps = tempered_logps(pv.policy, h, ids_RxT[:, -N:], T, chunk)
    h_ref = ref(ids_RxT, attn_RxT, return_hidden=True)[:, -N - 1:-1]
    ref_logps = tempered_logps(ref, h_ref, ids_RxT[:, -N:], T, chunk)
    scores = sequence_scores(rm, ids_RxT, attn_RxT)
    out = ppo_advantages(scores, logps, ref_logps, values, comp_ids_RxN, comp_mask_RxN, eos_id=eos, **kw)
    out.update(logps=jnp.where(comp_mask_RxN > 0, logps, 0.0), raw_scores=scores)
    return out


# ---------------------------------------------------------------------------------------------- loss


def ppo_train_loss(model: PolicyValueModel, batch, ref_model, cfg):
    """L = `ppo_policy_loss` (over the policy mask) + vf_coef · `ppo_value_loss` (over the value mask), TRL's
    PPOTrainer minibatch loss, on a minibatch of a rollout (module docstring)."""
    p = cfg.ppo
    N = batch["completion_mask"].shape[1]
    h, values = model.completion_hidden_and_values(batch["input_ids"], batch["attention_mask"], N)
    logps, entropy = tempered_logps(model.policy, h, batch["input_ids"][:, -N:], p.temperature, cfg.chunk_size,
                                     return_entropy=True)
    m, vm = batch["completion_mask"], batch["value_mask"]
    pg_loss, pm = losses.ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], m, clip=p.cliprange)
    vf_loss, vmet = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], vm,
                                          clip_value=p.cliprange_value)
    ratio = clamped_exp(jax.lax.stop_gradient(logps) - batch["old_logps"])  # as in the policy loss
    ratio_mean = masked_mean(ratio, m)
    metrics = {"policy/approxkl_avg": pm["policy/approxkl"], "policy/clipfrac_avg": pm["policy/clipfrac"],
               "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss, "val/clipfrac_avg": vmet["val/clipfrac"],
               "val/vpred": vmet["val/vpred"],
               "policy/entropy_avg": safe_div(masked_sum(jax.lax.stop_gradient(entropy), m), masked_count(m)),
               "val/ratio": ratio_mean, "val/ratio_token_var": masked_mean((ratio - ratio_mean) ** 2, m)}
    return pg_loss + p.vf_coef * vf_loss, metrics


def ppo_eval(model, batch, ref_model, cfg):
    """Online PPO has no per-example held-out loss on prompts: evaluate by generation (`eval_generation`)."""
    return {}


# ---------------------------------------------------------------------------------------------- the rollout hook


class PPORollout(BlockRollout):
    """`rollout(params, next_batch, step) -> (minibatch, metrics)` for the training loop (module docstring): a
    rollout every K steps (`rl.rollout.BlockRollout`), each step one minibatch of it."""

    def __init__(self, *, config, graphdef, rest, ref, tokenizer, mesh, workdir):
        from align_jax.sampling import Sampler

        super().__init__()
        p = config.ppo
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        self.K, self.N, self.P = p.num_ppo_epochs * p.num_mini_batches, p.response_length, config.data.max_prompt_length
        self.M = config.batch_size // p.num_mini_batches  # rows per minibatch (= per train step)
        replicas = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.M % replicas or (self.M // replicas) % config.optimizer.grad_accum_steps:
            refuse("ppo.num_mini_batches", f"a minibatch of batch_size / num_mini_batches = {self.M} rows must split "
                                         f"over the {replicas} data-parallel replicas and then into "
                                         f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.sampler = Sampler(max_new_tokens=self.N, temperature=p.temperature, eos_ids=(self.eos,),
                               pad_id=self.pad, num_generations=1, mesh=mesh)
        self.graphdef, self.rest = graphdef, rest
        self.ref_graphdef, self.ref_params, self.ref_rest, _ = ref
        rm = load_reward_model(p.reward_model, mesh=mesh, dtype=config.model.dtype)
        self.rm_graphdef, self.rm_params, self.rm_rest = nnx.split(rm, nnx.Param, ...)
        self.kw = (("temperature", float(p.temperature)), ("chunk_size", int(config.chunk_size)),
                   ("eos_id", int(self.eos)), ("kl_coef", float(p.kl_coef)), ("kl_estimator", p.kl_estimator),
                   ("gamma", float(p.gamma)), ("lam", float(p.lam)), ("whiten_rewards", bool(p.whiten_rewards)),
                   ("missing_eos_penalty", None if p.missing_eos_penalty is None else float(p.missing_eos_penalty)))
        self.samples = SampleLog(workdir)
        self.last = None
        self.t_start = None  # (time, episodes) at this process's first rollout, for `eps`

    def select(self, full, block, i, fresh):
        """Step i of the block: minibatch i % num_mini_batches of epoch i // num_mini_batches, rows from a
        permutation of the global rollout seeded by (seed, block, epoch). `full` is the whole rollout (every
        process's rows); each process keeps its part of the minibatch, so `to_device` reassembles exactly the
        minibatch one process would train on."""
        p = self.config.ppo
        epoch, mb = divmod(i, p.num_mini_batches)
        perm = np.random.default_rng([self.config.seed, block, epoch]).permutation(self.config.batch_size)
        rows = perm[mb * self.M:(mb + 1) * self.M][batch_rows(self.M, self.mesh)]
        return {k: v[rows] for k, v in full.items()}

    def rollout(self, params, prompts: dict, step: int):
        """Samples and scores this process's prompts (one global computation over every process's rows); returns
        the whole rollout gathered from every process (`select` cuts each step's minibatch out of it) and the
        rollout metrics over all of it."""
        jax.block_until_ready(params)  # the previous update: not part of this rollout's time
        t0 = time.perf_counter()
        ids_BxP, mask_BxP = fixed_prompt_bucket(np.asarray(prompts["prompt_ids"]),
                                                 np.asarray(prompts["prompt_mask"]), self.P, self.pad)
        model = nnx.merge(self.graphdef, params, self.rest)
        dev = to_device({"ids": ids_BxP, "mask": mask_BxP}, self.mesh)  # the global prompt batch
        out = self.sampler(model.policy, dev["ids"], dev["mask"],
                           rng=jax.random.fold_in(jax.random.key(self.config.seed), step))
        comp_ids = local_rows(out.completion_ids, self.mesh).astype(np.int32)
        comp_mask = local_rows(out.completion_mask, self.mesh).astype(np.int32)
        t_sampled = time.perf_counter()
        ids = np.concatenate([ids_BxP, comp_ids], 1)
        attn = np.concatenate([mask_BxP, comp_mask], 1)
        dev = to_device({"ids": ids, "attn": attn, "cids": comp_ids, "cmask": comp_mask}, self.mesh)
        t = rollout_tensors(
            params, self.rest, self.ref_params, self.ref_rest, self.rm_params, self.rm_rest, dev["ids"],
            dev["attn"], dev["cids"], dev["cmask"], pv_graphdef=self.graphdef, ref_graphdef=self.ref_graphdef,
            rm_graphdef=self.rm_graphdef, N=self.N, kw=self.kw)  # whitening over the whole (global) rollout
        t = {k: local_rows(v, self.mesh) for k, v in t.items()}
        local = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp_mask,
                 "value_mask": t["value_mask"], "old_logps": t["logps"], "old_values": t["values"],
                 "advantages": t["advantages"], "returns": t["returns"]}
        batch = {k: gather_rows(v, self.mesh) for k, v in local.items()}  # every process's rows
        B = batch["input_ids"].shape[0]
        kl_coef = self.config.ppo.kl_coef
        lengths = comp_mask.sum(1)
        gather = functools.partial(gather_rows, mesh=self.mesh)
        kl_R, scores_R, contain_eos_R = gather(t["kl"].sum(1)), gather(t["scores"]), gather(t["contain_eos"])
        non_score_R = gather((-kl_coef * t["kl"]).sum(1))
        entropy_R = gather((-np.where(comp_mask > 0, t["logps"], 1.0)).sum(1))  # TRL's fill value
        num_eos_R, lengths_R = gather(((comp_ids == self.eos) & (comp_mask > 0)).sum(1)), gather(lengths)
        non_score = non_score_R.mean()
        now = time.perf_counter()
        dt = now - t0
        episode = (step // self.K + 1) * B
        if self.t_start is None:
            self.t_start = (t0, episode - B)
        eps = int((episode - self.t_start[1]) / max(now - self.t_start[0], 1e-9))
        m = {"objective/kl": float(kl_R.mean()),
             "objective/entropy": float(entropy_R.mean()),
             "objective/non_score_reward": float(non_score),
             "objective/rlhf_reward": float(non_score + scores_R.mean()),
             "objective/scores": float(scores_R.mean()),
             "val/num_eos_tokens": float(num_eos_R.sum()),
             "completions/mean_length": float(lengths_R.mean()),
             "completions/clipped_ratio": float(1.0 - contain_eos_R.mean()),
             "episode": float(episode), "eps": float(eps), "rollout_seconds": dt,
             "timing/sampling_seconds": t_sampled - t0,
             "timing/scoring_seconds": now - t_sampled}  # reward model, values, pi_old and pi_ref log-probs
        texts = self.tokenizer.batch_decode([r[:n].tolist() for r, n in zip(comp_ids, lengths)],
                                            skip_special_tokens=True)
        rows = batch_rows(B, self.mesh)
        self.last = {"step": step, "prompts": list(prompts["prompt_text"]), "completions": texts,
                     "scores": t["scores"], "batch": batch, "tensors": t, "rows": rows}
        if log_due(step, self.K, self.config.ppo.get("log_completions_every", 0)):
            n_log = min(int(self.config.ppo.get("num_completions_to_log", 8)), B)
            logged = [{"row": rows.start + i, "prompt": prompt_str(prompts["prompt_text"][i]), "completion": texts[i],
                       "reward": float(t["scores"][i]),
                       "advantage": float(t["advantages"][i][:max(lengths[i], 1)].mean())}
                      for i in range(min(len(texts), max(n_log - rows.start, 0)))]
            self.samples.write(step + 1, first_rows(logged, n_log))
        return batch, m


def make_ppo_rollout(*, config, graphdef, rest, ref, tokenizer, mesh, workdir) -> PPORollout:
    return PPORollout(config=config, graphdef=graphdef, rest=rest, ref=ref, tokenizer=tokenizer, mesh=mesh,
                      workdir=workdir)


def ppo_steps(config) -> int:
    return config.ppo.num_ppo_epochs * config.ppo.num_mini_batches


PPO = register(Algorithm("ppo", "prompt_only", ppo_train_loss, ppo_eval, needs_reference=True,
                         loss_prefixes=("ppo",), make_rollout=make_ppo_rollout, validate=validate_ppo_config,
                         build_model=build_policy_value_model, steps_per_rollout=ppo_steps))
