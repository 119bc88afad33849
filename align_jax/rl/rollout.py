"""Pieces every online algorithm (GRPO, RLOO, PPO) shares: config checks, the fixed prompt bucket, the rollout
schedule, the group rollout (sample G completions per prompt, score them, log-probs of π_old and π_ref), and
the sample log.

Schedule (`BlockRollout`): a rollout happens every K = `steps_per_rollout` optimizer steps; the K steps of a
block re-use it (`select` cuts the step's batch out of it). Sampling uses rng = fold_in(key(seed), step) at the
block's first step, and checkpoints fall on block boundaries (each algorithm's config check enforces it), so a
resumed run restarts with a fresh rollout from the restored params, data iterator and step: bit-identical to a
run that never stopped. (After SIGTERM in the middle of a block the resumed run samples a new rollout for the
rest of that block: not bit-identical, documented.)
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from flax import nnx

from align_jax.errors import refuse
from align_jax.logfile import read_metrics
from align_jax.models.logps import completion_logps_jit
from align_jax.parallel import to_device
from align_jax.rl import rewards as rewards_lib

log = logging.getLogger(__name__)


def validate_online(config, name: str) -> None:
    """Checks shared by the online algorithms: prompt-only data padded to a fixed prompt bucket, reference
    log-probs computed per rollout, one host."""
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


def validate_sampling(config, section: str, *, rollout_steps: int) -> None:
    """Checks of a group-sampling section (`config.grpo`, `config.rloo`: num_generations, num_iterations,
    max_completion_length, temperature, top_p, max_failed_reward_steps) and of the reward functions; the
    checkpoint interval and the run length must be whole rollouts."""
    if section not in config:
        refuse(section, f"missing: start from configs/{section}.py")
    g = config[section]
    if not isinstance(g.num_generations, int) or g.num_generations < 2:
        refuse(f"{section}.num_generations", f"must be an integer >= 2 (group statistics), got {g.num_generations!r}")
    if not isinstance(g.num_iterations, int) or g.num_iterations < 1:
        refuse(f"{section}.num_iterations", f"must be an integer >= 1, got {g.num_iterations!r}")
    if config.checkpoint.every_steps % rollout_steps:
        refuse("checkpoint.every_steps", f"{config.checkpoint.every_steps} is not a multiple of {section}."
                                       f"num_iterations={rollout_steps}: a checkpoint must fall on a rollout "
                                       "boundary so that a resumed run restarts exactly")
    if not config.get("num_epochs", 0) and config.total_steps % rollout_steps:
        refuse("total_steps", f"{config.total_steps} is not a multiple of {section}.num_iterations={rollout_steps}: "
                            "a run must end on a rollout boundary so that extending it later resumes exactly")
    failed = g.get("max_failed_reward_steps", 3)
    if not isinstance(failed, int) or failed < 0:
        refuse(f"{section}.max_failed_reward_steps", f"must be an integer >= 0 (0 = never stop), got {failed!r}")
    if not isinstance(g.max_completion_length, int) or g.max_completion_length < 1:
        refuse(f"{section}.max_completion_length", f"must be a positive integer, got {g.max_completion_length!r}")
    if not g.temperature > 0:
        refuse(f"{section}.temperature", f"must be > 0, got {g.temperature!r}")
    if not 0 < g.top_p <= 1:
        refuse(f"{section}.top_p", f"must be in (0, 1], got {g.top_p!r}")
    if "rewards" not in config or not config.rewards.functions:
        refuse("rewards.functions", f"{section.upper()} needs at least one reward function")
    weights = tuple(config.rewards.get("weights", ()) or ())
    if weights and len(weights) != len(config.rewards.functions):
        refuse("rewards.weights", f"{len(weights)} weights for {len(config.rewards.functions)} reward functions")


# ---------------------------------------------------------------------------------------------- prompts, batches


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
    """A group rollout's training batch (R = B·G rows; prompt b -> rows b·G .. b·G + G − 1):

        input_ids      [R, P+N]  prompt (left-padded) ++ completion (right-padded)
        attention_mask [R, P+N]  prompt mask ++ loss mask
        completion_mask [R, N]   the loss mask: the sampler's mask (tokens up to and including EOS), zeroed for
                                 completions without EOS when `mask_truncated` (TRL mask_truncated_completions)
        advantages     [R]
        num_items      [R]       Σ completion_mask / grad_accum_steps (the DAPO normaliser: with gradient
                                 accumulation the step's loss is Σ_batch m·ℓ / Σ_batch m, TRL's
                                 `num_items_in_batch`)
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


def prompt_str(prompt) -> str:
    """A prompt (string or chat messages) as one line of text, for logs."""
    if isinstance(prompt, str):
        return prompt
    return " ".join(f"{m['role']}: {m['content']}" for m in prompt)


def nanstd(x, axis=None):
    """Unbiased std over the finite values (TRL `nanstd`); NaN when there are fewer than 2."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(np.where(ok, x, 0), axis=axis, keepdims=True) / np.maximum(ok.sum(axis=axis, keepdims=True), 1)
        ss = np.nansum(np.where(ok, (x - mean) ** 2, 0), axis=axis)
        return np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1)), np.nan)


def nanmean(x) -> float:
    """Mean over the finite values; NaN when there are none."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def plain(d) -> dict:
    """A ConfigDict / dict of dicts -> plain dicts."""
    if d is None:
        return {}
    return d.to_dict() if hasattr(d, "to_dict") else {k: dict(v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------- sample log


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
            keep = [line for row, line in read_metrics(self.path) if row["step"] < step]  # torn lines dropped
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


def log_due(step: int, steps_per_rollout: int, every: int) -> bool:
    """Whether the rollout made at loop step `step` (used for steps step+1 .. step+K) covers a multiple of
    `every` (the sample log's interval; 0 = never)."""
    every = max(int(every or 0), 0)
    return bool(every) and (step + steps_per_rollout - 1) // every > (step - 1) // every


# ---------------------------------------------------------------------------------------------- schedule


class BlockRollout:
    """`rollout(params, next_batch, step) -> (batch, metrics)`, the hook the training loop calls for an online
    algorithm: a new rollout (`rollout(params, prompts, step) -> (full batch, metrics)`) at the first step of
    each block of K = `self.K` steps, then `select(full, block, i, fresh)` gives step i's batch of the block."""

    K = 1

    def __init__(self):
        self.cache = None  # (block index, full batch, metrics)

    def __call__(self, params, next_batch, step: int):
        block, i = divmod(step, self.K)
        fresh = self.cache is None or self.cache[0] != block
        if fresh:
            self.cache = (block, *self.rollout(params, next_batch(), step))
        _, full, metrics = self.cache
        return self.select(full, block, i, fresh), metrics

    def rollout(self, params, prompts: dict, step: int):
        raise NotImplementedError

    def select(self, full: dict, block: int, i: int, fresh: bool) -> dict:
        return full


# ---------------------------------------------------------------------------------------------- group rollout


class GroupRollout(BlockRollout):
    """G completions per prompt from the current policy, scored by reward functions (GRPO, RLOO).

    Per rollout (K = `<section>.num_iterations` steps share it):
      1. the next B prompts, left-padded to the fixed P = `data.max_prompt_length`, and G =
         `<section>.num_generations` samples of each (KV-cache `Sampler`: temperature, top_p, top_k; up to
         N = `<section>.max_completion_length` tokens, stopping at EOS), rng = fold_in(key(seed), step);
      2. rewards (`align_jax.rl.rewards`): r_i = nansum_k w_k r_ik, NaN when every function failed
         (`<section>.max_failed_reward_steps` consecutive all-failed rollouts stop the run);
      3. the training batch (`training_batch`; `<section>.mask_truncated_completions`);
      4. log π_old (one forward of the sampling policy, at temperature T) when K > 1 (`old_logps`, with
         `first_pass` = 1 on the block's first step, 0 on re-uses) or when the algorithm asks for it
         (`wants_old_logps`); log π_ref (one forward of the frozen reference) whenever there is one;
      5. `advantages(rewards_R, batch, old_logps, ref_logps) -> (advantages [R], metrics)`: the algorithm's.

    Metrics (TRL's names): `reward`, `reward_std`, `rewards/<fn>/mean|std|num_failed`, `frac_reward_zero_std`,
    `completions/mean_length|min_length|max_length|clipped_ratio|mean_terminated_length`, `num_unscorable`,
    `rollout_seconds`, plus the algorithm's. `last` holds the host-side view of the latest rollout."""

    section = "grpo"
    wants_old_logps = False

    def __init__(self, *, config, graphdef, rest, ref, tokenizer, mesh, workdir):
        from align_jax.sampling import Sampler

        super().__init__()
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        g = config[self.section]
        self.g = g
        self.G, self.K, self.N, self.P = g.num_generations, g.num_iterations, g.max_completion_length, \
            config.data.max_prompt_length
        self.functions = rewards_lib.load_reward_functions(
            tuple(config.rewards.functions), plain(config.rewards.get("kwargs")))
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
        self.last = None
        self.max_failed = int(g.get("max_failed_reward_steps", 3))
        self.failed = []  # (step, first failure) of the consecutive rollouts on which every reward failed

    def advantages(self, rewards_R, batch, old_logps, ref_logps):
        raise NotImplementedError

    def select(self, full, block, i, fresh):
        if not fresh and "first_pass" in full:  # a re-used rollout: π_old is the rollout's
            return {**full, "first_pass": np.zeros_like(full["first_pass"])}
        return full

    def check_failures(self, scored, step: int) -> None:
        """RewardFailureError when no completion got a reward in `max_failed_reward_steps` consecutive
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
            f"config.{self.section}.max_failed_reward_steps sets how many such rollouts stop the run (0 = never)")

    def forward(self, graphdef, params, rest, ids, attn):
        """Per-token log π(completion) [R, N] of a frozen copy (π_old, π_ref) at the sampling temperature."""
        dev = to_device({"ids": ids, "attn": attn}, self.mesh)
        out = completion_logps_jit(graphdef, params, rest, dev["ids"], dev["attn"], **self.fwd)
        return np.asarray(jax.device_get(out), np.float32)

    def rollout(self, params, prompts: dict, step: int):
        t0 = time.perf_counter()
        g, G, N = self.g, self.G, self.N
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
        self.check_failures(scored, step)

        R = B * G
        batch = training_batch(ids_BxP, mask_BxP, comp_ids, comp_mask, np.zeros((R,), np.float32), eos_id=self.eos,
                               mask_truncated=g.mask_truncated_completions,
                               grad_accum_steps=self.config.optimizer.grad_accum_steps)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        old = ref = None
        if self.K > 1 or self.wants_old_logps:
            old = self.forward(self.graphdef, params, self.rest, ids, attn)
        if self.K > 1:
            batch["old_logps"] = old
            batch["first_pass"] = np.ones((R,), np.float32)
        if self.ref_params is not None:
            ref = self.forward(self.ref_graphdef, self.ref_params, self.ref_rest, ids, attn)
            batch["ref_logps"] = ref
        adv, extra = self.advantages(scored.total, batch, old, ref)
        batch["advantages"] = np.asarray(adv, np.float32)

        # metrics (TRL's names and definitions)
        m = {"reward": nanmean(scored.total), "reward_std": float(nanstd(scored.total)),
             "num_unscorable": float(np.isnan(scored.total).sum())}
        for k, name in enumerate(scored.names):
            m[f"rewards/{name}/mean"] = nanmean(scored.per_function[:, k])
            m[f"rewards/{name}/std"] = float(nanstd(scored.per_function[:, k]))
            m[f"rewards/{name}/num_failed"] = float(sum(f.function == name for f in scored.failures))
        if g.get("scale_rewards", "group") == "batch":
            std_rows = np.full((R,), nanstd(scored.total))
        else:
            std_rows = np.repeat(nanstd(scored.total.reshape(-1, G), axis=1), G)
        m["frac_reward_zero_std"] = float(np.mean(np.isclose(std_rows, 0.0, rtol=1e-5, atol=1e-8)))  # NaN: False
        m["completions/mean_length"] = float(lengths.mean())
        m["completions/min_length"] = float(lengths.min())
        m["completions/max_length"] = float(lengths.max())
        m["completions/clipped_ratio"] = float(1.0 - terminated.mean())
        m["completions/mean_terminated_length"] = float(lengths[terminated].mean()) if terminated.any() else 0.0
        m.update(extra)
        m["rollout_seconds"] = time.perf_counter() - t0

        adv = batch["advantages"]
        self.last = {"step": step, "prompts": prompt_text, "completions": texts, "completion_ids": completion_ids,
                     "rewards_per_function": scored.per_function, "rewards": scored.total, "advantages": adv,
                     "failures": scored.failures, "batch": batch, "old_logps": old, "ref_logps": ref}
        if log_due(step, self.K, g.get("log_completions_every", 0)):
            rows = [{"prompt": prompt_str(prompt_text[i]), "completion": texts[i], "reward": float(scored.total[i]),
                     "advantage": float(adv[i]),
                     "rewards": {n: float(scored.per_function[i, k]) for k, n in enumerate(scored.names)}}
                    for i in range(min(R, int(g.get("num_completions_to_log", 8))))]
            self.samples.write(step + 1, rows)
        return batch, m
