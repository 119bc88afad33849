"""Pieces every online algorithm (GRPO, RLOO, PPO) shares: config checks, the fixed prompt bucket, the rollout
schedule, the group rollout (sample G completions per prompt, score them, log-probs of π_old and π_ref), and
the sample log.

Several processes (`jax.process_count()` > 1): every process runs the same rollout code on its own prompt rows
(the loader gives each process its 1/process_count of the batch). The sampler and the π_old / π_ref forwards
are one global jitted computation over the global batch (inputs assembled from every process's rows by
`to_device`, parameters already global), so with rng = fold_in(key(seed), step) they draw what one process
with the same global batch would. Each process then reads back only its own rows (`local_rows`), decodes and
scores its own completions, and gathers (`gather_rows`) what is batch-global: the rewards for the advantages and
the logged statistics, the loss normaliser `num_items`. A prompt's G samples are consecutive rows of the
process that holds the prompt (checked). Only process 0 writes the sample log.

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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from align_jax.errors import refuse
from align_jax.logfile import read_metrics
from align_jax.models.logps import completion_logps_jit
from align_jax.parallel import BATCH, to_device
from align_jax.rl import rewards as rewards_lib

log = logging.getLogger(__name__)


def validate_online(config, name: str) -> None:
    """Checks shared by the online algorithms: prompt-only data padded to a fixed prompt bucket, reference
    log-probs computed per rollout."""
    if config.data.kind not in ("", "prompt_only"):
        refuse("data.kind", f"{name} samples from prompts: use '' or 'prompt_only', got {config.data.kind!r}")
    P = config.data.max_prompt_length
    if not P or P < 1:
        refuse("data.max_prompt_length", f"{name} pads prompts to this fixed length (the prompt bucket): set it > 0")
    if max(config.data.length_buckets) < P:
        refuse("data.length_buckets", f"the largest bucket must be >= data.max_prompt_length={P}")
    if config.reference.precompute:
        refuse("reference.precompute", f"not available for {name} (reference log-probs are computed per rollout)")


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


# ---------------------------------------------------------------------------------------------- processes


def batch_rows(n: int, mesh) -> slice:
    """This process's rows [start, stop) of a global batch of `n` rows split over the mesh's batch axes (the
    layout `to_device` assembles from every process's rows); slice(0, n) on one process."""
    if jax.process_count() == 1:
        return slice(0, n)
    spans = sorted({r.indices(n)[:2] for r in (i[0] for i in NamedSharding(mesh, P(BATCH)).
                                                addressable_devices_indices_map((n,)).values())})
    start, stop = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"this process's rows of the batch are not contiguous: {spans}")
        stop = max(stop, b)
    return slice(start, stop)


def local_rows(x, mesh) -> np.ndarray:
    """This process's rows (`batch_rows`) of a global array as numpy, read from its addressable shards (never a
    transfer of the whole array); the whole array on one process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    rows = batch_rows(x.shape[0], mesh)
    out = np.empty((rows.stop - rows.start, *x.shape[1:]), x.dtype)
    filled = np.zeros((rows.stop - rows.start,), bool)
    for shard in x.addressable_shards:
        if shard.data.shape[1:] != x.shape[1:]:  # split on another dimension: gather the whole array
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))[rows]
        a, b, _ = shard.index[0].indices(x.shape[0])
        lo, hi = max(a, rows.start), min(b, rows.stop)
        if lo < hi and not filled[lo - rows.start:hi - rows.start].all():
            out[lo - rows.start:hi - rows.start] = np.asarray(shard.data)[lo - a:hi - a]
            filled[lo - rows.start:hi - rows.start] = True
    if not filled.all():
        raise ValueError(f"rows {rows.start}..{rows.stop} of an array of shape {x.shape} are not all on this process")
    return out


def gather_rows(x, mesh) -> np.ndarray:
    """Every process's rows of a batch (the rows `to_device` would assemble, in global order), bit-exact for any
    numeric dtype: the global numpy array on every process. `x` itself on one process."""
    if jax.process_count() == 1:
        return x
    x = np.ascontiguousarray(x)
    n = x.shape[0]
    raw = x.reshape(n, -1).view(np.uint8).reshape(n, -1) if x.size else np.zeros((n, 1), np.uint8)
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P(BATCH, None)), raw)
    full = np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    if not x.size:
        return np.zeros((full.shape[0], *x.shape[1:]), x.dtype)
    return np.ascontiguousarray(full).view(x.dtype).reshape(full.shape[0], *x.shape[1:])


def gather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, ...] (JSON-serialisable objects) on every process; [obj] on one."""
    if jax.process_count() == 1:
        return [obj]
    blob = np.frombuffer(json.dumps(obj, default=str).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32))).reshape(-1)
    buf = np.zeros((max(int(sizes.max()), 1),), np.uint8)
    buf[:blob.size] = blob
    bufs = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bufs[i, :sizes[i]].tobytes().decode()) for i in range(len(sizes))]


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


def first_rows(rows: list[dict], n: int) -> list[dict]:
    """The first `n` sample-log rows of the global batch (each dict has its global "row", dropped here) from
    every process's candidates; on one process `rows[:n]`. Every process must call it (a collective)."""
    everyone = [r for part in gather_objects(rows) for r in part] if jax.process_count() > 1 else rows
    return [{k: v for k, v in r.items() if k != "row"} for r in sorted(everyone, key=lambda r: r["row"])[:n]]


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
        if not fresh:  # no sampling in this step: its time is all update
            metrics = {k: (0.0 if k == "rollout_seconds" or k.startswith("timing/") else v) for k, v in metrics.items()}
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
      5. `advantages(rewards_R, batch, old_logps, ref_logps) -> (advantages [R], metrics)`: the algorithm's, on
         this process's R rows (`self.rows` of the global batch); `self.gather(x)` gives every process's rows of
         a per-row array, for statistics of the whole batch (same result on every process).

    Metrics (TRL's names): `reward`, `reward_std`, `rewards/<fn>/mean|std|num_failed`, `frac_reward_zero_std`,
    `completions/mean_length|min_length|max_length|clipped_ratio|mean_terminated_length`, `num_unscorable`,
    `rollout_seconds`, plus the algorithm's, over the whole (global) batch. `last` holds the host-side view of the
    latest rollout (this process's rows)."""

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

    def gather(self, x) -> np.ndarray:
        """Every process's rows of a per-row array of this rollout, in global row order (`gather_rows`)."""
        return gather_rows(x, self.mesh)

    def check_failures(self, scored, total_R, step: int) -> None:
        """RewardFailureError when no completion got a reward in `max_failed_reward_steps` consecutive
        rollouts (every advantage 0: the run would not learn). `total_R`: the rewards of every process (the
        decision is the same on all)."""
        if not np.isnan(total_R).all():
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
        """Per-token log π(completion) [R, N] of a frozen copy (π_old, π_ref) at the sampling temperature, for
        this process's rows (`ids`, `attn`: its rows of the global batch)."""
        dev = to_device({"ids": ids, "attn": attn}, self.mesh)
        out = completion_logps_jit(graphdef, params, rest, dev["ids"], dev["attn"], **self.fwd)
        return local_rows(out, self.mesh).astype(np.float32)

    def rollout(self, params, prompts: dict, step: int):
        jax.block_until_ready(params)  # the previous update: not part of this rollout's time
        t0 = time.perf_counter()
        g, G, N = self.g, self.G, self.N
        ids_BxP, mask_BxP = fixed_prompt_bucket(np.asarray(prompts["prompt_ids"]),
                                                 np.asarray(prompts["prompt_mask"]), self.P, self.pad)
        B = ids_BxP.shape[0]  # this process's prompts
        model = nnx.merge(self.graphdef, params, self.rest)
        dev = to_device({"ids": ids_BxP, "mask": mask_BxP}, self.mesh)  # the global prompt batch
        out = self.sampler(model, dev["ids"], dev["mask"], rng=jax.random.fold_in(jax.random.key(self.config.seed),
                                                                                  step))
        comp_ids = local_rows(out.completion_ids, self.mesh).astype(np.int32)
        comp_mask = local_rows(out.completion_mask, self.mesh).astype(np.int32)
        t_sampled = time.perf_counter()
        R = B * G
        prompt_rows, self.rows = batch_rows(dev["ids"].shape[0], self.mesh), batch_rows(out.completion_ids.shape[0],
                                                                                         self.mesh)
        if (self.rows.start, self.rows.stop) != (prompt_rows.start * G, prompt_rows.stop * G) or len(comp_ids) != R:
            raise AssertionError(f"the samples of this process's prompts {prompt_rows} are not its rows {self.rows}")
        lengths = comp_mask.sum(1)
        terminated = ((comp_ids == self.eos) & (comp_mask > 0)).any(1)

        # rewards on text (this process's completions)
        completion_ids = [row[:n].tolist() for row, n in zip(comp_ids, lengths)]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompt_text = [prompts["prompt_text"][b] for b in range(B) for _ in range(G)]
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for p, t in zip(prompt_text, texts)]
        extras = [prompts["extra"][b] or {} for b in range(B) for _ in range(G)]
        columns = {k: [e.get(k) for e in extras] for k in sorted({k for e in extras for k in e})}
        scored = rewards_lib.score(self.functions, self.weights, prompt_text, completions,
                                   completion_ids=completion_ids, max_completion_length=N, **columns)
        total = self.gather(scored.total)  # every process's rewards: batch statistics, metrics
        self.check_failures(scored, total, step)
        t_scored = time.perf_counter()

        batch = training_batch(ids_BxP, mask_BxP, comp_ids, comp_mask, np.zeros((R,), np.float32), eos_id=self.eos,
                               mask_truncated=g.mask_truncated_completions,
                               grad_accum_steps=self.config.optimizer.grad_accum_steps)
        if jax.process_count() > 1:  # the DAPO normaliser counts the loss tokens of the whole (global) batch
            items = self.gather(batch["completion_mask"].sum(1)).sum()
            batch["num_items"] = np.full((R,), items / self.config.optimizer.grad_accum_steps, np.float32)
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
        t_logps = time.perf_counter()
        adv, extra = self.advantages(scored.total, batch, old, ref)
        batch["advantages"] = np.asarray(adv, np.float32)

        # metrics (TRL's names and definitions), over every process's rows
        per_function = self.gather(scored.per_function)
        lengths_all, terminated_all = self.gather(lengths), self.gather(terminated)
        m = {"reward": nanmean(total), "reward_std": float(nanstd(total)),
             "num_unscorable": float(np.isnan(total).sum())}
        failed = np.asarray([sum(f.function == name for f in scored.failures) for name in scored.names], np.float64)
        failed = np.sum(gather_objects(failed.tolist()), axis=0) if jax.process_count() > 1 else failed
        for k, name in enumerate(scored.names):
            m[f"rewards/{name}/mean"] = nanmean(per_function[:, k])
            m[f"rewards/{name}/std"] = float(nanstd(per_function[:, k]))
            m[f"rewards/{name}/num_failed"] = float(failed[k])
        if g.get("scale_rewards", "group") == "batch":
            std_rows = np.full(total.shape, nanstd(total))
        else:
            std_rows = np.repeat(nanstd(total.reshape(-1, G), axis=1), G)
        m["frac_reward_zero_std"] = float(np.mean(np.isclose(std_rows, 0.0, rtol=1e-5, atol=1e-8)))  # NaN: False
        m["completions/mean_length"] = float(lengths_all.mean())
        m["completions/min_length"] = float(lengths_all.min())
        m["completions/max_length"] = float(lengths_all.max())
        m["completions/clipped_ratio"] = float(1.0 - terminated_all.mean())
        m["completions/mean_terminated_length"] = (float(lengths_all[terminated_all].mean()) if terminated_all.any()
                                                   else 0.0)
        m.update(extra)
        m["rollout_seconds"] = time.perf_counter() - t0
        m["timing/sampling_seconds"] = t_sampled - t0
        m["timing/scoring_seconds"] = t_scored - t_sampled
        m["timing/logps_seconds"] = t_logps - t_scored  # pi_old and pi_ref log-probs

        adv = batch["advantages"]
        self.last = {"step": step, "prompts": prompt_text, "completions": texts, "completion_ids": completion_ids,
                     "rewards_per_function": scored.per_function, "rewards": scored.total, "advantages": adv,
                     "failures": scored.failures, "batch": batch, "old_logps": old, "ref_logps": ref,
                     "rows": self.rows}
        if log_due(step, self.K, g.get("log_completions_every", 0)):
            n_log = min(int(g.get("num_completions_to_log", 8)), total.shape[0])
            rows = [{"row": self.rows.start + i, "prompt": prompt_str(prompt_text[i]), "completion": texts[i],
                     "reward": float(scored.total[i]), "advantage": float(adv[i]),
                     "rewards": {n: float(scored.per_function[i, k]) for k, n in enumerate(scored.names)}}
                    for i in range(min(R, max(n_log - self.rows.start, 0)))]
            self.samples.write(step + 1, first_rows(rows, n_log))
        return batch, m
