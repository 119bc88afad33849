"""GRPO (Shao et al. 2024) on the shared training loop, as TRL 1.x `GRPOTrainer` computes it; offline GRPO on
ranked groups. The rollout machinery (sampling, rewards, π_old / π_ref, sample log) is `rl.rollout.GroupRollout`.

Online, algorithm "grpo" (data kind prompt_only). A rollout happens every μ = `grpo.num_iterations` steps:

  1. the next B prompts, left-padded to the fixed P = `data.max_prompt_length`, and G = `grpo.num_generations`
     samples of each from the current policy (KV-cache `Sampler`: temperature, top_p, top_k; up to
     N = `grpo.max_completion_length` tokens, stopping at EOS), rng = fold_in(key(seed), step): a resumed run
     draws the same samples;
  2. rewards (`align_jax.rl.rewards`): r_i = nansum_k w_k r_ik, NaN when every function failed; advantages
     A = `losses.grpo_advantages(r, G, scale_rewards)` (`group_advantages`: NaN-aware when some r_i is NaN);
  3. `grpo.mask_truncated_completions`: a completion without a stop token gets loss mask 0 and attention
     mask 0 on its completion tokens (TRL);
  4. log π_old: when μ = 1 the detached current log-probs in the loss (ratio 1, as TRL); when μ > 1 one
     forward of the sampling policy right after sampling (`old_logps`), used on the μ − 1 re-uses; on a
     rollout's first pass (`first_pass` = 1) the policy *is* π_old and the loss uses the detached current
     log-probs, so the ratio is exactly 1 as in TRL (XLA compiles the forward inside the gradient differently
     from the rollout's, which would leave ulp noise). log π_ref: one forward of the frozen reference,
     whenever there is one (`loss.reference_free` False): KL is then logged even at β = 0, where it adds
     exactly 0 to the loss; at step 0 (`policy_is_reference`, set by the train step) π_ref = π exactly.

The batch (R = B·G rows: `input_ids`/`attention_mask` [R, P+N], `completion_mask` [R, N] (the loss mask),
`advantages` [R], `num_items` [R], `old_logps`/`ref_logps` [R, N] and `first_pass` [R] when present) goes
through the normal jitted train step μ times in a row (the rollout is cached), with `losses.grpo_loss` (any
`grpo:*` variant and `loss.kwargs` beta / epsilon / epsilon_high / importance_sampling_level). Shapes are
fixed (P, N, B, G), so the sampler and the train step compile once.

Log-probs, as TRL: log_softmax(logits / T)[y] over the completion tokens (T = `grpo.temperature`), for the
policy, π_old and π_ref alike; token entropies of the same tempered distribution come from the chunked op
`align_jax.ops.token_logps(..., return_entropy=True)`. Positions are cumsum(attention_mask) − 1 (those the
sampler used).

DAPO normalisation: `num_items` = (loss tokens of the whole batch) / grad_accum_steps, so that with gradient
accumulation the step's loss is Σ_batch m·ℓ / Σ_batch m, TRL's `num_items_in_batch` (without accumulation
it equals the default, Σ m of the batch).

Checkpoints must fall on rollout boundaries (`checkpoint.every_steps` a multiple of μ, enforced), so a resumed
run restarts with a fresh rollout from restored params, data iterator and step: bit-identical to a run that
never stopped. (After SIGTERM in the middle of a rollout the resumed run samples a new rollout for the rest of
that block: not bit-identical, documented.)

Logged per step (rollout metrics repeat for the μ steps that share a rollout): `reward`, `reward_std`,
`rewards/<fn>/mean|std|num_failed`, `frac_reward_zero_std`, `completions/mean_length|min_length|max_length|
clipped_ratio|mean_terminated_length`, `num_unscorable`, `rollout_seconds`; from the loss: `kl`, `entropy`,
`clip_ratio/low_mean|high_mean|region_mean`, `log_ratio/abs_mean` (masked mean |log π − log π_old|: exactly
0 on the first pass over a rollout, > 0 on re-used ones). Every `grpo.log_completions_every` steps the first
`grpo.num_completions_to_log` samples go to `<workdir>/samples.jsonl` and TensorBoard text, under the metrics
step of the first update made with them (rollout at loop step s -> step s + 1).

Offline, algorithm "grpo_offline" (data kind groupwise, e.g. toy:groups_ranked): no sampling; each group's K
responses form a GRPO group with advantages from `losses.rank_advantages(ranks, group_mask)` or, with
`grpo.offline_advantages = "scores"`, from the group-normalised scores; [B, K, L] is flattened to [B·K, L]
and `grpo_loss` runs with π_old = the detached current log-probs (ratio 1), temperature 1.
"""


from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import losses
from align_jax.algorithms.base import Algorithm, register
from align_jax.errors import refuse
from align_jax.losses.common import masked_count, masked_sum, safe_div
from align_jax.models.logps import completion_logps, group_token_logps
from align_jax.rl.rollout import GroupRollout, validate_online, validate_sampling

_SCALES = ("group", "batch", "none")


def validate_grpo_config(config) -> None:
    """Refuses a GRPO config that cannot work, naming the key (ConfigValueError)."""
    if "grpo" not in config:
        refuse("grpo", "missing: start from configs/grpo.py")
    validate_sampling(config, "grpo", rollout_steps=config.grpo.num_iterations
                      if isinstance(config.grpo.num_iterations, int) and config.grpo.num_iterations >= 1 else 1)
    if config.grpo.scale_rewards not in _SCALES:
        refuse("grpo.scale_rewards", f"must be one of {_SCALES}, got {config.grpo.scale_rewards!r}")
    validate_online(config, "GRPO")
    beta = config.loss.kwargs.get("beta", 0.0)
    if config.loss.get("reference_free", False) and beta != 0:
        refuse("loss.reference_free", f"True, but loss.kwargs.beta={beta} needs the reference model")


def _loss_kwargs(cfg) -> dict:
    return {k: v for k, v in cfg.loss.kwargs.items()}


def grpo_train_loss(model, batch, ref_model, cfg):
    """`grpo_loss` on a rollout batch (module docstring). π_old = the detached current log-probs (μ = 1, and the
    first pass over a rollout) or batch["old_logps"] (re-uses); π_ref = batch["ref_logps"] when present."""
    N = batch["completion_mask"].shape[1]
    logps, entropy = completion_logps(model, batch["input_ids"], batch["attention_mask"], N,
                                      temperature=cfg.grpo.temperature, chunk_size=cfg.chunk_size,
                                      return_entropy=True)
    mask = batch["completion_mask"]
    current = jax.lax.stop_gradient(logps)
    old = current
    if "old_logps" in batch:  # μ > 1: π_old from the rollout, except on a rollout's first pass (π_old = π exactly)
        old = jnp.where(batch["first_pass"][:, None] > 0, current, batch["old_logps"])
    ref = batch.get("ref_logps")
    if ref is not None and "policy_is_reference" in batch:  # before the first update π = π_ref exactly
        ref = jnp.where(batch["policy_is_reference"], current, ref)
    loss, metrics = losses.get_loss(cfg.loss.name)(
        logps, old, batch["advantages"], mask, ref_token_logps=ref,
        token_entropy=jax.lax.stop_gradient(entropy), max_completion_length=N,
        num_items_in_batch=batch["num_items"][0], **_loss_kwargs(cfg))
    diff = jax.lax.stop_gradient(jnp.abs(logps - old))
    metrics["log_ratio/abs_mean"] = safe_div(masked_sum(diff, mask), masked_count(mask))
    return loss, metrics


def grpo_eval(model, batch, ref_model, cfg):
    """Online GRPO has no per-example held-out loss on prompts: evaluate by generation (`eval_generation`)."""
    return {}


# ---------------------------------------------------------------------------------------------- advantages


def nan_group_advantages(rewards, group_size: int, scale_rewards: str = "group"):
    """TRL 1.x's NaN-aware advantages: over the finite rewards of each group (consecutive runs of `group_size`)

        A_i = r_i − mean_g,  divided by (std_g + 1e-4) ("group") or (std_batch + 1e-4) ("batch"),
    with unbiased std over the finite values (0 when there is one), and A_i = 0 where r_i is not finite
    (TRL: nanmean / nanstd, then nan_to_num). Equal to `losses.grpo_advantages` up to rounding when every
    reward is finite. Works under jit (fixed shapes). Returns [N] float32."""
    if scale_rewards not in _SCALES:
        raise ValueError(f"scale_rewards must be one of {_SCALES}, got {scale_rewards!r}")
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    valid = jnp.isfinite(r)
    x = jnp.where(valid, r, 0.0)
    n = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(x, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
    dev = jnp.where(valid, r - mean, 0.0)

    def std(sq_sum, count):
        var = sq_sum / jnp.maximum(count - 1.0, 1.0)
        return jnp.where(count > 1, jnp.sqrt(jnp.where(count > 1, var, 0.0)), 0.0)

    if scale_rewards == "group":
        dev = dev / (std(jnp.sum(dev**2, axis=1, keepdims=True), n) + 1e-4)
    elif scale_rewards == "batch":
        ntot = jnp.sum(n)
        mu = jnp.sum(x) / jnp.maximum(ntot, 1.0)
        dev = dev / (std(jnp.sum(jnp.where(valid, (r - mu) ** 2, 0.0)), ntot) + 1e-4)
    return jnp.where(valid, dev, 0.0).reshape(-1)


def group_advantages(rewards, group_size: int, scale_rewards: str = "group") -> np.ndarray:
    """`losses.grpo_advantages` when every reward is finite (the exact library values); otherwise
    `nan_group_advantages` (unscorable completions excluded from their group's statistics, advantage 0)."""
    r = np.asarray(rewards, np.float32)
    if np.isfinite(r).all():
        return np.asarray(losses.grpo_advantages(r, group_size, scale_rewards=scale_rewards), np.float32)
    return np.asarray(nan_group_advantages(r, group_size, scale_rewards), np.float32)


# ---------------------------------------------------------------------------------------------- rollout


class GRPORollout(GroupRollout):
    """The group rollout (`rl.rollout.GroupRollout`: sampling, rewards, π_old, π_ref, metrics, sample log) with
    GRPO's advantages: `group_advantages(rewards, G, grpo.scale_rewards)` over the rewards of every process
    (the "batch" scale is a statistic of the global batch), this process's rows kept."""

    section = "grpo"

    def advantages(self, rewards_R, batch, old_logps, ref_logps):
        return group_advantages(self.gather(rewards_R), self.G, self.g.scale_rewards)[self.rows], {}


def make_grpo_rollout(*, config, graphdef, rest, ref, tokenizer, mesh, workdir) -> GRPORollout:
    return GRPORollout(config=config, graphdef=graphdef, rest=rest, ref=ref, tokenizer=tokenizer, mesh=mesh,
                       workdir=workdir)


# ---------------------------------------------------------------------------------------------- offline


def offline_advantages(batch, how: str = "ranks", scale_rewards: str = "group"):
    """[B, K] advantages of a groupwise batch: `rank_advantages(ranks, group_mask)` ("ranks") or the
    group-normalised `scores` over the valid slots ("scores": `nan_group_advantages` with padded slots as NaN,
    = `grpo_advantages(scores, K)` for full groups)."""
    if how == "ranks":
        return losses.rank_advantages(batch["ranks"], batch["group_mask"], scale_rewards=scale_rewards)
    if how == "scores":
        B, K = batch["scores"].shape
        r = jnp.where(batch["group_mask"] > 0, batch["scores"].astype(jnp.float32), jnp.nan)
        return nan_group_advantages(r, K, scale_rewards).reshape(B, K)
    refuse("grpo.offline_advantages", f"must be 'ranks' or 'scores', got {how!r}")


def grpo_offline_loss(model, batch, ref_model, cfg):
    (logps, entropy), mask = group_token_logps(model, batch, cfg.chunk_size, True)
    g = cfg.get("grpo", {}) or {}
    adv = offline_advantages(batch, g.get("offline_advantages", "ranks"), g.get("scale_rewards", "group"))
    ref = None
    if ref_model is not None:
        ref, _ = group_token_logps(ref_model, batch, cfg.chunk_size, False)
        ref = jax.lax.stop_gradient(ref)
        if "policy_is_reference" in batch:  # before the first update π = π_ref exactly
            ref = jnp.where(batch["policy_is_reference"], jax.lax.stop_gradient(logps), ref)
    return losses.get_loss(cfg.loss.name)(logps, jax.lax.stop_gradient(logps), adv.reshape(-1), mask,
                                          ref_token_logps=ref, token_entropy=jax.lax.stop_gradient(entropy),
                                          **_loss_kwargs(cfg))


def grpo_offline_eval(model, batch, ref_model, cfg):
    """Top-1: the response with the highest mean token log-prob is a best-ranked one."""
    logps, mask = group_token_logps(model, batch, cfg.chunk_size, False)
    B, K = batch["group_mask"].shape
    seq = (safe_div(masked_sum(logps, mask, axis=-1), masked_count(mask, axis=-1))).reshape(B, K)
    _, _, top1, _ = losses.ranking_hits(seq, batch["ranks"], batch["group_mask"])
    return {"top1_accuracy": top1.astype(jnp.float32)}


def grpo_steps(config) -> int:
    return config.grpo.num_iterations


_GRPO_FILLED = ("ref_token_logps", "token_entropy", "max_completion_length", "num_items_in_batch")
GRPO = register(Algorithm("grpo", "prompt_only", grpo_train_loss, grpo_eval, needs_reference=True,
                          loss_prefixes=("grpo",), filled_loss_args=_GRPO_FILLED, make_rollout=make_grpo_rollout,
                          validate=validate_grpo_config, steps_per_rollout=grpo_steps))
GRPO_OFFLINE = register(Algorithm("grpo_offline", "groupwise", grpo_offline_loss, grpo_offline_eval,
                                  needs_reference=True, supports_packing=True, loss_prefixes=("grpo",), filled_loss_args=_GRPO_FILLED))
