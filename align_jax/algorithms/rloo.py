"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740), as TRL 1.x `RLOOTrainer` computes it.

A complete online algorithm in one file: the rollout is the shared group rollout (`rl.rollout.GroupRollout`:
G = `rloo.num_generations` samples per prompt, reward functions, log π_old and log π_ref), and this module adds
RLOO's advantages, its loss adapter and its config checks:

  1. reward r_i = nansum_k w_k r_ik of the reward functions (`rewards.functions`, `rewards.weights`); a completion
     on which every function failed gets 0 (TRL's nansum);
  2. with β = `rloo.beta` > 0 the KL to the reference is folded into the reward (not the loss):
     r_i ← r_i − β·Σ_t (log π_old − log π_ref)_t over the completion mask (`losses.sequence_kl`);
  3. leave-one-out baseline: A_i = r_i − (Σ_{j∈group} r_j − r_i)/(G − 1), optionally normalised over the
     batch (`rloo.normalize_advantages`) (`losses.rloo_advantages`);
  4. loss: one importance ratio per sequence, ρ_i = exp(Σ_t m·log π − Σ_t m·log π_old), L = mean_i
     −min(ρ_i·A_i, clip(ρ_i, 1 − ε, 1 + ε_high)·A_i) (`losses.rloo_loss`; `loss.kwargs` epsilon, epsilon_high).

π_old is the detached current policy on a rollout's first pass (ratio exactly 1) and the rollout's forward on
re-uses (`rloo.num_iterations` > 1). Logged: GroupRollout's rollout metrics (reward, reward_std,
rewards/<fn>/mean, completions/..., frac_reward_zero_std), `kl` (mean per-token log π_old − log π_ref over the
completion mask, when β > 0), and from the loss `entropy`, `clip_ratio/low_mean|high_mean|region_mean`.

    python -m align_jax.main --config=configs/rloo.py --workdir=/tmp/rloo --config.model.init_from=/tmp/sft/export
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import losses
from align_jax.algorithms.base import Algorithm, register
from align_jax.errors import refuse
from align_jax.models.logps import completion_logps
from align_jax.rl.rollout import GroupRollout, validate_online, validate_sampling


def validate(config) -> None:
    if "rloo" not in config:
        refuse("rloo", "missing: start from configs/rloo.py")
    mu = config.rloo.num_iterations
    validate_sampling(config, "rloo", rollout_steps=mu if isinstance(mu, int) and mu >= 1 else 1)
    validate_online(config, "RLOO")
    beta = config.rloo.beta
    if not isinstance(beta, (int, float)) or not np.isfinite(beta) or beta < 0:
        refuse("rloo.beta", f"must be a finite number >= 0, got {beta!r}")
    if config.loss.get("reference_free", False) and beta != 0:
        refuse("loss.reference_free", f"True, but rloo.beta={beta} needs the reference model (set rloo.beta=0)")


class RLOORollout(GroupRollout):
    section = "rloo"

    @property
    def wants_old_logps(self):  # the KL folded into the reward needs log π_old of the sampling policy
        return self.g.beta != 0

    def advantages(self, rewards_R, batch, old_logps, ref_logps):
        """Over the rows of every process (`normalize_advantages` and the logged KL are statistics of the global
        batch); returns this process's rows."""
        r = np.nan_to_num(np.asarray(self.gather(rewards_R), np.float32), nan=0.0)
        seq_kl, metrics = None, {}
        if self.g.beta != 0:
            mask, old, ref = (self.gather(x) for x in (batch["completion_mask"], old_logps, ref_logps))
            per_token = (old - ref) * mask
            seq_kl = np.asarray(losses.sequence_kl(old, ref, mask))
            metrics["kl"] = float(per_token.sum() / max(mask.sum(), 1.0))
        adv = losses.rloo_advantages(r, self.G, seq_kl=seq_kl, beta=float(self.g.beta),
                                     normalize_advantages=bool(self.g.normalize_advantages))
        return np.asarray(adv, np.float32)[self.rows], metrics


def make_rollout(*, config, graphdef, rest, ref, tokenizer, mesh, workdir) -> RLOORollout:
    return RLOORollout(config=config, graphdef=graphdef, rest=rest, ref=ref, tokenizer=tokenizer, mesh=mesh,
                       workdir=workdir)


def rloo_train_loss(model, batch, ref_model, cfg):
    """`losses.rloo_loss` on a rollout batch; π_old = the detached current log-probs on a rollout's first pass,
    else batch["old_logps"]."""
    N = batch["completion_mask"].shape[1]
    logps, entropy = completion_logps(model, batch["input_ids"], batch["attention_mask"], N,
                                      temperature=cfg.rloo.temperature, chunk_size=cfg.chunk_size,
                                      return_entropy=True)
    old = jax.lax.stop_gradient(logps)
    if "old_logps" in batch:
        old = jnp.where(batch["first_pass"][:, None] > 0, old, batch["old_logps"])
    return losses.get_loss(cfg.loss.name)(logps, old, batch["advantages"], batch["completion_mask"],
                                          token_entropy=jax.lax.stop_gradient(entropy), **dict(cfg.loss.kwargs))


def rloo_eval(model, batch, ref_model, cfg):
    """Online: no per-example held-out loss on prompts; evaluated by generation (`eval_generation`)."""
    return {}


RLOO = register(Algorithm("rloo", "prompt_only", rloo_train_loss, rloo_eval, needs_reference=True,
                          loss_prefixes=("rloo",), filled_loss_args=("token_entropy",), validate=validate,
                          make_rollout=make_rollout, steps_per_rollout=lambda config: config.rloo.num_iterations))
