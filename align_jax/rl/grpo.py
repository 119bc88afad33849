"""GRPO (Shao et al. 2024) on the shared training loop, as TRL 1.x `GRPOTrainer` computes it; offline GRPO on
ranked groups.

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

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax import losses
from align_jax.losses.common import masked_count, masked_sum, safe_div
from align_jax.ops import token_logps
from align_jax.rl import rewards as rewards_lib
from align_jax.train.algorithms import ALGORITHMS, Algorithm, completion_token_logps

log = logging.getLogger(__name__)

_SCALES = ("group", "batch", "none")


def refuse(key: str, msg: str):
    from align_jax.train.validate import ConfigValueError

    raise ConfigValueError(f"config.{key}: {msg}")


def validate_online(config, name: str) -> None:
    """Checks shared by the online algorithms (GRPO, PPO): prompt-only data padded to a fixed prompt bucket,
    reference log-probs computed per rollout, one host."""
    if config.data.kind not in ("", "prompt_only"):
        refuse("data.kind", f"{name} samples from prompts: use '' or 'prompt_only', got {config.data.kind!r}")
    P = config.data.max_prompt_length
    if not P or P < 1:
        refuse("data.max_prompt_length", f"{name} pads prompts to this fixed length (the prompt bucket): set it > 0")
    if max(config.data.length_buckets) < P:
        refuse("data.length_buckets", f"the largest bucket must be >= data.max_prompt_length={P}")
    if config.reference.precompute:
        refuse("reference.precompute", f"not available for {name} (reference log-probs are computed per rollout)")
    if jax.process_count() > 1:
        refuse("mesh", f"{name} runs on one host for now (the sampler and rewards take host-local prompts)")


def validate_grpo_config(config) -> None:
    """Refuses a GRPO config that cannot work, naming the key (ConfigValueError)."""
    if "grpo" not in config:
        refuse("grpo", "missing: start from configs/grpo.py")
    g = config.grpo
    if not isinstance(g.num_generations, int) or g.num_generations < 2:
        refuse("grpo.num_generations", f"must be an integer >= 2 (group statistics), got {g.num_generations!r}")
    if not isinstance(g.num_iterations, int) or g.num_iterations < 1:
        refuse("grpo.num_iterations", f"must be an integer >= 1, got {g.num_iterations!r}")
    if config.checkpoint.every_steps % g.num_iterations:
        refuse("checkpoint.every_steps", f"{config.checkpoint.every_steps} is not a multiple of grpo.num_iterations="
                                       f"{g.num_iterations}: a checkpoint must fall on a rollout boundary so that "
                                       "a resumed run restarts exactly")
    if not config.get("num_epochs", 0) and config.total_steps % g.num_iterations:
        refuse("total_steps", f"{config.total_steps} is not a multiple of grpo.num_iterations={g.num_iterations}: a "
                            "run must end on a rollout boundary so that extending it later resumes exactly")
    failed = g.get("max_failed_reward_steps", 3)
    if not isinstance(failed, int) or failed < 0:
        refuse("grpo.max_failed_reward_steps", f"must be an integer >= 0 (0 = never stop), got {failed!r}")
    if not isinstance(g.max_completion_length, int) or g.max_completion_length < 1:
        refuse("grpo.max_completion_length", f"must be a positive integer, got {g.max_completion_length!r}")
    if not g.temperature > 0:
        refuse("grpo.temperature", f"must be > 0, got {g.temperature!r}")
    if not 0 < g.top_p <= 1:
        refuse("grpo.top_p", f"must be in (0, 1], got {g.top_p!r}")
    if g.scale_rewards not in _SCALES:
        refuse("grpo.scale_rewards", f"must be one of {_SCALES}, got {g.scale_rewards!r}")
    validate_online(config, "GRPO")
    beta = config.loss.kwargs.get("beta", 0.0)
    if config.loss.get("reference_free", False) and beta != 0:
        refuse("loss.reference_free", f"True, but loss.kwargs.beta={beta} needs the reference model")
    if "rewards" not in config or not config.rewards.functions:
        refuse("rewards.functions", "GRPO needs at least one reward function")
    weights = tuple(config.rewards.get("weights", ()) or ())
    if weights and len(weights) != len(config.rewards.functions):
        refuse("rewards.weights", f"{len(weights)} weights for {len(config.rewards.functions)} reward functions")


# ---------------------------------------------------------------------------------------------- log-probs


def completion_logps(model, input_ids_RxT, attention_mask_RxT, num_completion_tokens: int, *, temperature=1.0,
                     chunk_size: int = 8192, return_entropy: bool = False):
    """log_softmax(logits / T)[y] of the last N tokens of each row ([R, N]; rows = left-padded prompt of P
    tokens followed by N completion slots), and their entropies when `return_entropy`. Positions are
    cumsum(attention_mask) − 1 (clipped at 0), as in the sampler. Only the N completion positions go through
    the LM head (TRL's `logits_to_keep`)."""
    N = num_completion_tokens
    h_RxTxD = model(input_ids_RxT, attention_mask_RxT, return_hidden=True)  # positions: cumsum(mask) - 1
    h_RxNxD = h_RxTxD[:, -N - 1:-1]
    if temperature != 1.0:
        h_RxNxD = h_RxNxD / jnp.asarray(temperature, h_RxNxD.dtype)  # (h/T) W = logits / T
    return token_logps(h_RxNxD, model.lm_head_DxV(), input_ids_RxT[:, -N:], chunk_size=chunk_size,
                       return_entropy=return_entropy)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_completion_tokens", "temperature", "chunk_size"))
def _logps_jit(graphdef, params, rest, ids, attn, *, num_completion_tokens, temperature, chunk_size):
    """`completion_logps` of nnx.merge(graphdef, params, rest) (π_old and π_ref in the rollout); module-level so
    the compiled program is shared by every run of the process."""
    return completion_logps(nnx.merge(graphdef, params, rest), ids, attn, num_completion_tokens,
                            temperature=temperature, chunk_size=chunk_size)


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


def _nanstd(x, axis=None):
    """Unbiased std over the finite values (TRL `nanstd`); NaN when there are fewer than 2."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(np.where(ok, x, 0), axis=axis, keepdims=True) / np.maximum(ok.sum(axis=axis, keepdims=True), 1)
        ss = np.nansum(np.where(ok, (x - mean) ** 2, 0), axis=axis)
        return np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1)), np.nan)


def _nanmean(x):
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


# ---------------------------------------------------------------------------------------------- rollout


def fixed_prompt_bucket(ids_BxL, mask_BxL, P: int, pad_id: int):
    """Left-padded prompts [B, L] -> [B, P] (left-pad more, or drop leading all-padding columns)."""
    B, L = ids_BxL.shape
    if L > P:
        if mask_BxL[:, : L - P].any():
            raise ValueError(f"a prompt is longer than data.max_prompt_length={P}")
        return ids_BxL[:, L - P:], mask_BxL[:, L - P:]
    ids = np.full((B, P), pad_id, np.int32)
    mask = np.zeros((B, P), np.int32)
    ids[:, P - L:], mask[:, P - L:] = ids_BxL, mask_BxL
    return ids, mask


def training_batch(prompt_ids_BxP, prompt_mask_BxP, completion_ids_RxN, completion_mask_RxN, advantages_R, *,
                   eos_id: int, mask_truncated: bool = False, grad_accum_steps: int = 1) -> dict:
    """The rollout's training batch (R = B·G rows; prompt b -> rows b·G .. b·G + G − 1):

        input_ids      [R, P+N]  prompt (left-padded) ++ completion (right-padded)
        attention_mask [R, P+N]  prompt mask ++ loss mask
        completion_mask [R, N]   the loss mask: the sampler's mask (tokens up to and including EOS), zeroed for
                                 completions without EOS when `mask_truncated` (TRL mask_truncated_completions)
        advantages     [R]
        num_items      [R]       Σ completion_mask / grad_accum_steps (DAPO's normaliser, module docstring)
    """
    R, N = completion_ids_RxN.shape
    G = R // prompt_ids_BxP.shape[0]
    comp_mask = np.asarray(completion_mask_RxN, np.int32)
    if mask_truncated:
        terminated = ((completion_ids_RxN == eos_id) & (comp_mask > 0)).any(1)
        comp_mask = comp_mask * terminated[:, None].astype(np.int32)
    return {"input_ids": np.concatenate([np.repeat(prompt_ids_BxP, G, 0), completion_ids_RxN], 1).astype(np.int32),
            "attention_mask": np.concatenate([np.repeat(prompt_mask_BxP, G, 0), comp_mask], 1).astype(np.int32),
            "completion_mask": comp_mask,
            "advantages": np.asarray(advantages_R, np.float32),
            "num_items": np.full((R,), comp_mask.sum() / grad_accum_steps, np.float32)}


class SampleLog:
    """Sample completions to <workdir>/samples.jsonl (+ TensorBoard text); drops lines of steps >= the first
    step logged by this process (a killed run may have logged past its last checkpoint)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "samples.jsonl")
        self.workdir = workdir
        self.truncated = False
        self.tb = None

    def write(self, step: int, rows: list[dict]) -> None:
        if jax.process_index() != 0:
            return
        if not self.truncated and os.path.exists(self.path):
            from align_jax.train.metrics_io import read_metrics  # a torn line (killed mid-write) is dropped

            keep = [line for row, line in read_metrics(self.path) if row["step"] < step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.truncated = True
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}, default=str) + "\n")
        try:
            if self.tb is None:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), filename_suffix=".samples")
            esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            md = ["| prompt | completion | reward | advantage |", "|---|---|---|---|"]
            md += [f"| {esc(r['prompt'])} | {esc(r['completion'])} | {r['reward']:.3f} | {r['advantage']:.3f} |"
                   for r in rows]
            self.tb.add_text("completions", "\n".join(md), step)
            self.tb.flush()
        except Exception as e:  # noqa: BLE001 — TensorBoard text is a convenience
            log.warning("could not write samples to TensorBoard: %s", e)


def _plain(d) -> dict:
    """A ConfigDict / dict of dicts -> plain dicts."""
    if d is None:
        return {}
    return d.to_dict() if hasattr(d, "to_dict") else {k: dict(v) for k, v in d.items()}


def prompt_str(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return " ".join(f"{m['role']}: {m['content']}" for m in prompt)


class GRPORollout:
    """`rollout(params, next_batch, step) -> (batch, metrics)` for the training loop (module docstring).
    `last` holds the host-side view of the latest rollout (texts, per-function rewards, advantages, ...)."""

    def __init__(self, *, config, graphdef, rest, ref, tokenizer, mesh, workdir):
        from align_jax.sampling import Sampler

        validate_grpo_config(config)
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        g = config.grpo
        self.G, self.mu, self.N, self.P = g.num_generations, g.num_iterations, g.max_completion_length, \
            config.data.max_prompt_length
        self.functions = rewards_lib.load_reward_functions(
            tuple(config.rewards.functions), _plain(config.rewards.get("kwargs")))
        self.weights = tuple(float(w) for w in (config.rewards.get("weights") or ())) or (1.0,) * len(self.functions)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.sampler = Sampler(max_new_tokens=self.N, temperature=g.temperature, top_k=g.get("top_k", 0),
                               top_p=g.top_p, eos_ids=(self.eos,), pad_id=self.pad, num_generations=self.G,
                               mesh=mesh)
        self.graphdef, self.rest = graphdef, rest
        self.ref_graphdef, self.ref_params, self.ref_rest, _ = ref
        self.fwd = dict(num_completion_tokens=self.N, temperature=float(g.temperature), chunk_size=config.chunk_size)
        self.samples = SampleLog(workdir)
        self.cache = None  # (block index, batch, metrics)
        self.last = None
        self.max_failed = int(g.get("max_failed_reward_steps", 3))
        self.failed = []  # (step, first failure) of the consecutive rollouts on which every reward failed

    def __call__(self, params, next_batch, step: int):
        block = step // self.mu
        if self.cache is not None and self.cache[0] == block:  # a re-used rollout: the same arrays
            batch = self.cache[1]
            if "first_pass" in batch:
                batch = {**batch, "first_pass": np.zeros_like(batch["first_pass"])}
            return batch, self.cache[2]
        batch, metrics = self._rollout(params, next_batch(), step)
        self.cache = (block, batch, metrics)
        return batch, metrics

    def _check_failures(self, scored, step: int) -> None:
        """RewardFailureError when no completion got a reward in `grpo.max_failed_reward_steps` consecutive
        rollouts (every advantage 0: the run would not learn)."""
        if not np.isnan(scored.total).all():
            self.failed = []
            return
        self.failed.append((step, scored.failures[0] if scored.failures else None))
        if not self.max_failed or len(self.failed) < self.max_failed:
            return
        step0, f = self.failed[0]
        first = (f"{f.function} on completion #{f.index} ({f.error}; prompt {prompt_str(f.prompt)!r}, completion "
                 f"{prompt_str(f.completion)!r})" if f is not None else "none recorded")
        raise rewards_lib.RewardFailureError(
            f"reward functions {', '.join(scored.names)} failed for every completion in {len(self.failed)} "
            f"consecutive rollouts (for steps {step0 + 1} to {step + 1}); first failure: {first}. Fix the reward "
            f"functions (config.rewards.functions / rewards.kwargs) or the data columns they read; "
            f"config.grpo.max_failed_reward_steps sets how many such rollouts stop the run (0 = never)")

    def _forward(self, graphdef, params, rest, ids, attn):
        from align_jax.train.loop import to_device

        dev = to_device({"ids": ids, "attn": attn}, self.mesh)
        out = _logps_jit(graphdef, params, rest, dev["ids"], dev["attn"], **self.fwd)
        return np.asarray(jax.device_get(out), np.float32)

    def _rollout(self, params, prompts: dict, step: int):
        t0 = time.perf_counter()
        g, G, N = self.config.grpo, self.G, self.N
        ids_BxP, mask_BxP = fixed_prompt_bucket(np.asarray(prompts["prompt_ids"]),
                                                 np.asarray(prompts["prompt_mask"]), self.P, self.pad)
        B = ids_BxP.shape[0]
        model = nnx.merge(self.graphdef, params, self.rest)
        out = self.sampler(model, ids_BxP, mask_BxP, rng=jax.random.fold_in(jax.random.key(self.config.seed), step))
        comp_ids = np.asarray(jax.device_get(out.completion_ids), np.int32)
        comp_mask = np.asarray(jax.device_get(out.completion_mask), np.int32)
        lengths = comp_mask.sum(1)
        terminated = ((comp_ids == self.eos) & (comp_mask > 0)).any(1)

        # rewards on text
        completion_ids = [row[:n].tolist() for row, n in zip(comp_ids, lengths)]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompt_text = [prompts["prompt_text"][b] for b in range(B) for _ in range(G)]
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for p, t in zip(prompt_text, texts)]
        extras = [prompts["extra"][b] or {} for b in range(B) for _ in range(G)]
        columns = {k: [e.get(k) for e in extras] for k in sorted({k for e in extras for k in e})}
        scored = rewards_lib.score(self.functions, self.weights, prompt_text, completions,
                                   completion_ids=completion_ids, max_completion_length=N, **columns)
        self._check_failures(scored, step)
        adv = group_advantages(scored.total, G, g.scale_rewards)

        batch = training_batch(ids_BxP, mask_BxP, comp_ids, comp_mask, adv, eos_id=self.eos,
                               mask_truncated=g.mask_truncated_completions,
                               grad_accum_steps=self.config.optimizer.grad_accum_steps)
        ids, attn, R = batch["input_ids"], batch["attention_mask"], B * G
        if self.mu > 1:
            batch["old_logps"] = self._forward(self.graphdef, params, self.rest, ids, attn)
            batch["first_pass"] = np.ones((R,), np.float32)
        if self.ref_params is not None:
            batch["ref_logps"] = self._forward(self.ref_graphdef, self.ref_params, self.ref_rest, ids, attn)

        # metrics (TRL's names and definitions)
        m = {"reward": _nanmean(scored.total), "reward_std": float(_nanstd(scored.total)),
             "num_unscorable": float(np.isnan(scored.total).sum())}
        for k, name in enumerate(scored.names):
            m[f"rewards/{name}/mean"] = _nanmean(scored.per_function[:, k])
            m[f"rewards/{name}/std"] = float(_nanstd(scored.per_function[:, k]))
            m[f"rewards/{name}/num_failed"] = float(sum(f.function == name for f in scored.failures))
        if g.scale_rewards == "batch":
            std_rows = np.full((R,), _nanstd(scored.total))
        else:
            std_rows = np.repeat(_nanstd(scored.total.reshape(-1, G), axis=1), G)
        m["frac_reward_zero_std"] = float(np.mean(np.isclose(std_rows, 0.0, rtol=1e-5, atol=1e-8)))  # NaN: False
        m["completions/mean_length"] = float(lengths.mean())
        m["completions/min_length"] = float(lengths.min())
        m["completions/max_length"] = float(lengths.max())
        m["completions/clipped_ratio"] = float(1.0 - terminated.mean())
        m["completions/mean_terminated_length"] = float(lengths[terminated].mean()) if terminated.any() else 0.0
        m["rollout_seconds"] = time.perf_counter() - t0

        self.last = {"step": step, "prompts": prompt_text, "completions": texts, "completion_ids": completion_ids,
                     "rewards_per_function": scored.per_function, "rewards": scored.total, "advantages": adv,
                     "failures": scored.failures, "batch": batch}
        every = max(int(g.get("log_completions_every", 0) or 0), 0)
        if every and (step + self.mu - 1) // every > (step - 1) // every:
            rows = [{"prompt": prompt_str(prompt_text[i]), "completion": texts[i], "reward": float(scored.total[i]),
                     "advantage": float(adv[i]),
                     "rewards": {n: float(scored.per_function[i, k]) for k, n in enumerate(scored.names)}}
                    for i in range(min(R, int(g.get("num_completions_to_log", 8))))]
            self.samples.write(step + 1, rows)
        return batch, m


def make_grpo_rollout(*, config, graphdef, rest, ref, tokenizer, mesh, workdir) -> GRPORollout:
    return GRPORollout(config=config, graphdef=graphdef, rest=rest, ref=ref, tokenizer=tokenizer, mesh=mesh,
                       workdir=workdir)


# ---------------------------------------------------------------------------------------------- offline


def _flat_logps(model, batch, chunk_size: int, return_entropy: bool):
    """Groupwise batch [B, K, L] -> per-token log-probs (and entropies) of tokens 1..L-1 and the loss mask,
    [B·K, L-1] (rows of padded group slots are masked)."""
    B, K, L = batch["input_ids"].shape
    ids, attn, comp = (batch[k].reshape(B * K, L) for k in ("input_ids", "attention_mask", "completion_mask"))
    h = model(ids, attn, None, None, return_hidden=True)
    out = token_logps(h[:, :-1], model.lm_head_DxV(), ids[:, 1:], chunk_size=chunk_size,
                      return_entropy=return_entropy)
    mask = comp[:, 1:].astype(jnp.float32) * attn[:, 1:].astype(jnp.float32)
    valid = (batch["group_mask"] * batch["example_weight"][:, None]).reshape(B * K).astype(jnp.float32)
    return out, mask * valid[:, None]


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
    (logps, entropy), mask = _flat_logps(model, batch, cfg.chunk_size, True)
    g = cfg.get("grpo", {}) or {}
    adv = offline_advantages(batch, g.get("offline_advantages", "ranks"), g.get("scale_rewards", "group"))
    ref = None
    if ref_model is not None:
        B, K, L = batch["input_ids"].shape
        ref, _ = completion_token_logps(ref_model, batch["input_ids"].reshape(B * K, L),
                                        batch["attention_mask"].reshape(B * K, L),
                                        batch["completion_mask"].reshape(B * K, L), chunk_size=cfg.chunk_size)
        ref = jax.lax.stop_gradient(ref)
        if "policy_is_reference" in batch:  # before the first update π = π_ref exactly
            ref = jnp.where(batch["policy_is_reference"], jax.lax.stop_gradient(logps), ref)
    return losses.get_loss(cfg.loss.name)(logps, jax.lax.stop_gradient(logps), adv.reshape(-1), mask,
                                          ref_token_logps=ref, token_entropy=jax.lax.stop_gradient(entropy),
                                          **_loss_kwargs(cfg))


def grpo_offline_eval(model, batch, ref_model, cfg):
    """Top-1: the response with the highest mean token log-prob is a best-ranked one."""
    logps, mask = _flat_logps(model, batch, cfg.chunk_size, False)
    B, K = batch["group_mask"].shape
    seq = (safe_div(masked_sum(logps, mask, axis=-1), masked_count(mask, axis=-1))).reshape(B, K)
    valid = batch["group_mask"] > 0
    best = jnp.argmax(jnp.where(valid, seq, -jnp.inf), axis=-1)
    best_rank = jnp.min(jnp.where(valid, batch["ranks"], jnp.iinfo(jnp.int32).max), axis=-1)
    top1 = jnp.take_along_axis(batch["ranks"], best[:, None], axis=1)[:, 0] == best_rank
    return {"top1_accuracy": top1.astype(jnp.float32)}


ALGORITHMS["grpo"] = Algorithm("grpo", "prompt_only", grpo_train_loss, grpo_eval, needs_reference=True,
                               loss_prefixes=("grpo",), make_rollout=make_grpo_rollout,
                               validate=validate_grpo_config)
ALGORITHMS["grpo_offline"] = Algorithm("grpo_offline", "groupwise", grpo_offline_loss, grpo_offline_eval,
                                       needs_reference=True, loss_prefixes=("grpo",))
