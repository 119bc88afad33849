"""The four-technique comparison table of the project's description, measured on the embedded toy task.

    python experiments/compare_techniques.py --workdir=/tmp/align_jax_compare                 # default size
    python experiments/compare_techniques.py --workdir=/tmp/compare_tiny --size=tiny          # the test's size
    python experiments/compare_techniques.py --workdir=... --methods=DPO,ORPO --seeds=0,1,2,3 --steps=120

Claims examined (the project's description, issue 14 item 1):
  RLHF (reward model + PPO)  "maximum alignment control, expensive"
  DPO                        "simple, fast, stable"
  ORPO                       "smooth training, robust to noise, replaces binary indicators with calibrated
                             preference probabilities"
  GRPO                       "ranking over groups: more expressive signal per step, computationally more intensive"
The papers: InstructGPT (Ouyang et al. 2022), DPO (Rafailov et al. 2023), ORPO (Hong, Lee, Thorne 2024), GRPO
(Shao et al. 2024, DeepSeekMath). None of them has this table; the claims are the project's summary of them.

Setting. One shared SFT stage (`toy_pipeline.sft_stage`, seed --seed, default 0: configs/sft.py, 400 steps from
random init), then per method x seed, started from the SFT export with the project's `train(config, run_dir)` on
the named config with overrides (no new trainer code):
  RLHF          configs/reward_model.py (Bradley-Terry on the toy pairs with soft labels) then configs/ppo.py with
                that reward model (value model initialised from it, reference = SFT, k1 KL penalty 0.05, T 0.7)
  DPO           configs/dpo.py (sigmoid, β 0.1, reference = SFT)
  ORPO          configs/orpo.py (λ = β 0.1, no reference)
  GRPO online   configs/grpo.py (G = 8 samples per prompt at T = 1 scored by the toy task's gold reward; β 0, the
                reference kept for logging only, as the config does)
  GRPO offline  configs/grpo.py:offline (the toy task's ranked groups of 4 responses, rank advantages, no sampling,
                no reference)
Budget, equalised on the policy's optimizer: every method gets `steps` optimizer steps (default 60) and every step
trains on `completions` = 32 scored completions: 16 pairs (DPO, ORPO), 8 ranked groups of 4 (GRPO offline), 4
prompts x 8 samples (GRPO online), 32 prompts x 1 sample (PPO: a rollout feeds its num_ppo_epochs = 4 steps, so PPO
samples 32 fresh completions every 4 steps). The reward model of RLHF is an extra stage with the same budget
(`steps` steps of 16 pairs): the cost of RLHF is RM + PPO. Same steps and same completions per step give each
method the same number of policy gradient evaluations on the same number of sequences, so the measured seconds,
FLOPs and model calls show what each method spends *besides* them (reference and reward forwards, sampling, the
reward model). Each config keeps its own learning rate and schedule (DPO 1e-4 linear, PPO 1e-4 constant, GRPO 3e-4
constant, reward model 1e-4 constant), except ORPO, which gets DPO's 1e-4 linear (configs/orpo.py's 8e-6 is TRL's
default for billion-parameter models and barely moves the toy model: experiments/label_noise.py's docstring).

Columns.
  gold reward and the toy task's axes: `toy_pipeline.evaluate_policy` (greedy answers to `eval_prompts` held-out
    prompts, scored by the toy task's programs; preference accuracy = policy log-likelihood of chosen > rejected on
    the held-out pairs, the same quantity for every method).
  KL to SFT: E_{x, y~π(.|x)}[log π(y|x) − log π_SFT(y|x)], sequence level, the same for every method: `kl_samples`
    samples at temperature 1 (up to 12 tokens, stopping at EOS) from the trained policy for each of the first
    `kl_prompts` held-out prompts (`align_jax.sampling.Sampler`), both log-probs from one full forward each
    (`align_jax.models.logps.completion_logps_jit`, temperature 1, summed over the completion's tokens).
  seconds: wall-clock of `train()` of every stage the method needs (RLHF = RM + PPO; the shared SFT stage and the
    evaluation are not counted), less the time this script spends on the FLOP count.
  train FLOPs: XLA's own count (`jitted.lower(args).compile().cost_analysis()["flops"]`, as benchmarks/
    dpo_throughput.py) of every compiled train step the loop runs, once per input shape, times the number of calls
    with that shape; for the online methods also the rollout's compiled programs: the sampler
    (`sampling.generate._generate_jit`: XLA counts the body of its decode while-loop once, so this script counts
    prefill + decode steps x one step's FLOPs, with the decode steps the sampler reports), the π_ref / π_old
    forwards of GRPO (`completion_logps_jit`) and PPO's rollout pass (`rollout_tensors`: policy, value, reference
    and reward-model forwards). Not counted: the reward functions (Python), host work, the evaluations. The count
    intercepts those jitted functions while `train()` runs (`flop_counter`, below).
  model calls: from the configs' shapes and steps (`model_calls`, below), in sequences: every sequence through one
    model's forward is one call (a training forward and its backward count as one), and every generated token is
    one call of the sampler's decode step (the config's maximum N per sample: an upper bound, sampling stops when
    every row has ended). With S steps, B examples per step:
      DPO  S·2B policy + S·2B reference;  ORPO  S·2B policy;  reward model  S·2B;  GRPO offline  S·4B policy;
      GRPO online (B prompts x G samples, N tokens)  S·B·G policy + S·B·G reference + S·B prefill + S·B·G·N decode;
      PPO (B prompts, K = epochs x minibatches steps per rollout, R = S/K rollouts)  R·(B prefill + B·N decode +
      B policy + B value + B reference + B reward model) + S·(B/minibatches)·(policy + value).
  Label noise: the same after flipping a fraction `noise` (default 0.3) of the preference data, exactly
    round(noise·n) items, the first ones of a permutation drawn from the run's seed (experiments/label_noise.py's
    `flip_indices`, same salt, so DPO's flipped pairs are label_noise.py's): DPO and ORPO get the pairs with chosen
    and rejected swapped, the reward model the soft-label pairs with p -> 1 - p (the PPO stage then uses that noisy
    reward model), GRPO offline the ranked groups with the ranking reversed (rank_i -> the number of responses ranked
    worse than i). GRPO online has no labels (its reward is the gold program): it has no noisy row.

Verdicts (results.md, per claim a line "holds / does not hold here" with the numbers; "not distinguishable" when
the ± 1 std intervals over seeds overlap). How each word is made measurable:
  RLHF expensive: its seconds, FLOPs and model calls are the largest of the methods. Maximum alignment control:
    read as "reaches the most aligned policy": the highest gold reward (control of the trade-off with KL, which
    PPO's KL coefficient gives, is item 2's reward-KL frontier).
  DPO simple: one stage, two models (policy + frozen reference), no sampling (structural, from the configs). Fast:
    fewest seconds among DPO, RLHF and GRPO online (ORPO, with no reference, is cheaper still). Stable: its seed
    std of gold reward is at most the median seed std of the other methods.
  ORPO smooth training: the roughness of its training loss (RMS of the loss around its 5-step moving average,
    divided by the loss's drop from the first to the last 5 steps) is below DPO's. Robust to noise: its drop in
    gold reward from clean to noisy labels is smaller than DPO's. Calibrated probabilities: not measured (it
    needs held-out pairs with true preference probabilities; the toy task's held-out pairs have none).
  GRPO more expressive signal per step: at equal steps and equal completions per step, GRPO (online and offline)
    reaches a higher gold reward than DPO. Computationally more intensive: GRPO online's FLOPs and seconds exceed
    DPO's (offline GRPO has no sampling: listed apart).

Default size: 5 methods (RLHF, DPO, ORPO, GRPO online, GRPO offline) on clean labels + DPO and ORPO on noisy ones,
seeds 0, 1, 2 (21 runs; clean runs first, so an interrupted run has the clean table), 60 steps, the first 100
held-out prompts (all 300 held-out pairs), KL on 50 prompts x 4 samples. `--noisy_methods=RLHF,DPO,ORPO,
GRPO_offline` adds the noisy RLHF and GRPO-offline runs (27 runs); the cells run in one process per CPU, one core
each (`--jobs`; `--jobs=1`: one process, the same numbers). `--size=tiny`: RLHF and DPO clean, DPO noisy, one
seed, 4 steps of 8 completions, SFT 2 steps, 8 prompts, 32 held-out pairs (numbers meaningless; the test's size).

What differs from the papers. A 0.82 M-parameter Llama on a synthetic task, 60 steps per method (not to
convergence), all from one SFT model; PPO's reward model is trained on the same 2000 toy pairs as DPO; GRPO online
optimises the gold reward itself (an oracle the other methods do not see), so its gold reward is an upper reference,
not a like-for-like comparison; GRPO offline learns from the toy task's 500 ranked groups. Wall-clock seconds on a
shared 2-core machine vary with the load (runs.csv has both the all-in and the steady-state seconds); FLOPs and
model calls do not.

Measured at the default size (results.md; mean ± sample std over seeds 0-2; 100 held-out prompts; gold max 1.5;
seconds on a quiet 2-core machine, one core per run; ECE: calibration_scores):

                   gold reward      KL to SFT    seconds     train FLOPs  calls  gold, 30% flipped  ECE
    RLHF (RM+PPO)  0.918 ± 0.020    0.72 ± 0.36  36.8 ± 1.8  1.19e12  13920  —                  0.072 ± 0.012
    DPO            1.027 ± 0.006    0.54 ± 0.12  13.4 ± 1.2  4.36e11   3840  1.000 ± 0.033      0.204 ± 0.001
    ORPO           1.060 ± 0.010    0.32 ± 0.05  11.0 ± 1.1  3.27e11   1920  1.012 ± 0.020      0.155 ± 0.006
    GRPO online    0.943 ± 0.015    2.9 ± 3.8    13.3 ± 0.3  5.05e11  27120  (no labels)        —
    GRPO offline   0.547 ± 0.129    15.5 ± 3.8   10.5 ± 0.7  3.17e11   1920  —                  —
    SFT start      0.435            0

Verdicts: RLHF expensive: partly holds (largest seconds and FLOPs, 2.7x DPO's FLOPs; GRPO online makes more model
calls, 27120 vs 13920, most of them one-token decode steps). RLHF maximum alignment control (highest gold reward):
does not hold (ORPO 1.060 and DPO 1.027 above RLHF 0.918). DPO simple: holds (structural); fast: does not hold
(13.4 s vs online GRPO 13.3 s and ORPO 11.0 s: on the toy task sampling 12 tokens is cheap); stable: holds (seed
std 0.006, the smallest). ORPO smooth training: does not hold (loss roughness 0.75 ± 0.24 vs DPO 0.14 ± 0.03);
robust to noise: not distinguishable from DPO (gold drop 0.048 ± 0.019 vs 0.027 ± 0.038); calibrated probabilities:
holds (ECE 0.155 ± 0.006 vs DPO's 0.204 ± 0.001 against the toy's true σ((gold_w − gold_l)/1.5); the reward model,
trained on those soft labels, 0.072). GRPO more expressive signal per step: does not hold (online 0.943, offline
0.547 vs DPO 1.027 at equal steps and completions per step); computationally more intensive: does not hold in
seconds (13.3 vs 13.4 s) although online GRPO's FLOPs are higher (5.05e11 vs 4.36e11). With
`--noisy_methods=RLHF,DPO,ORPO,GRPO_offline` (an earlier run): noisy RLHF 0.798 ± 0.195, and offline GRPO on
reversed-for-30 % rankings 0.815 ± 0.074, higher than on clean ones (without a reference its policy drifts far,
KL 15.5 nats, and the noisy ranks slow that drift). Time: the default command took 6 min 03 s end to end on a quiet
2-core machine (SFT 81 s, then the 21 runs on both cores; 2026-11-30).

Writes to --workdir: runs.csv (every method x noise x seed), results.md (the description's table with the measured
columns next to its words, mean ± sample std over seeds, and the verdicts), results.json (config, numbers, command,
seconds) and results.png (a bar chart per metric, clean and noisy bars per method, error bars = std over seeds).
Each finished run (<workdir>/runs/<run>/result.json) is skipped on rerun; an interrupted one resumes from its
checkpoints (its seconds and FLOPs then cover the resumed part only: `resumed` in runs.csv).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time

import numpy as np
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import ablation as ab  # noqa: E402
import toy_pipeline as tp  # noqa: E402  (its flags: --workdir, --seed (SFT), --sft_steps, --eval_prompts, --threads)

from align_jax.errors import UserError  # noqa: E402

flags.DEFINE_string("size", "", "'' (default size) or 'tiny' (seconds, for tests).")
flags.DEFINE_list("methods", None, "Override the methods (RLHF, DPO, ORPO, GRPO_online, GRPO_offline).")
flags.DEFINE_list("seeds", None, "Override the seeds of the alignment stages (the SFT stage's is --seed).")
flags.DEFINE_integer("jobs", 0, "Run the grid's cells in this many processes, one CPU each (the same numbers as "
                     "1 job); 0 = one per CPU this process may use (2 on a 2-core machine about halves the time).")
flags.DEFINE_string("shard", "", "Internal (--jobs): compute only cells i, i+n, ... of the grid ('i/n').")
flags.DEFINE_integer("steps", 0, "Override the optimizer steps per method (0 = the size's default).")
flags.DEFINE_float("noise", None, "Override the flipped fraction of the preference data (0 = no noisy runs).")
flags.DEFINE_bool("report_only", False, "Train nothing: the table, plot and verdicts from the finished runs in "
                  "--workdir (missing cells listed in results.md).")
flags.DEFINE_list("noisy_methods", None, "Override the methods that also run on noisy labels (default: DPO, "
                  "ORPO; any of RLHF, DPO, ORPO, GRPO_offline).")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "/tmp/align_jax_compare")

METHODS = ("RLHF", "DPO", "ORPO", "GRPO_online", "GRPO_offline")
LABELS = {"RLHF": "RLHF (RM + PPO)", "DPO": "DPO", "ORPO": "ORPO", "GRPO_online": "GRPO online (gold reward)",
          "GRPO_offline": "GRPO offline (ranked groups)"}
HAS_LABELS = {"RLHF": True, "DPO": True, "ORPO": True, "GRPO_online": False, "GRPO_offline": True}
# The description's words (complexity, strengths, drawbacks), per technique
WORDS = {"RLHF": ("reward model + PPO: 4 models (policy, value, reference, reward)", "maximum alignment control",
                  "expensive"),
         "DPO": ("one stage, policy + frozen reference, no sampling", "simple, fast, stable", "—"),
         "ORPO": ("one stage, policy only (SFT + odds-ratio term)",
                  "smooth training, robust to noise, calibrated preference probabilities", "—"),
         "GRPO_online": ("sampling G per prompt + reward, policy (+ reference)",
                         "ranking over groups: more expressive signal per step", "computationally more intensive"),
         "GRPO_offline": ("ranked groups, policy only, no sampling", "ranking over groups", "needs ranked data")}
SHORT = {"RLHF": "RLHF", "DPO": "DPO", "ORPO": "ORPO", "GRPO_online": "GRPO\nonline", "GRPO_offline": "GRPO\noffline"}
FLIP_SALT = 143  # experiments/label_noise.py's: the same pairs are flipped for the same seed
FLOP_KINDS = ("train_step", "sampler", "logps", "ppo_rollout")
AXES = [(k, label, higher) for k, label, higher in tp.AXES]
METRICS = AXES + [("kl", "KL(π ‖ π_SFT) per sequence (nats)", False), ("seconds", "training wall-clock (s)", False),
                  ("step_seconds", "steady-state training time (s)", False),
                  ("train_flops", "train FLOPs (XLA count)", False), ("model_calls", "model calls (sequences)", False)]
DIGITS = {"seconds": 1, "step_seconds": 1, "model_calls": 0}
CSV_FIELDS = (["method", "noise", "seed"] + [k for k, _, _ in METRICS] +
              ["flops_" + k for k in FLOP_KINDS] + ["decode_steps", "forward_calls", "generated_tokens",
                                                   "roughness", "final_loss", "prob_error", "ece", "rm_accuracy",
                                                   "flipped", "resumed", "run"])


def get_config(arg: str = ""):
    """The experiment's config; `arg="tiny"`: a few steps of every method at one seed (the test's size)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.methods = METHODS
    # also run with `noise` flipped labels: the two the noise claim compares (ORPO "robust to noise" vs DPO); every
    # method with labels: --noisy_methods=RLHF,DPO,ORPO,GRPO_offline (27 runs instead of 21)
    c.noisy_methods = ("DPO", "ORPO")
    c.seeds = (0, 1, 2)
    c.steps = 60  # optimizer steps per method (and per reward model); a multiple of PPO's 4 steps per rollout
    c.completions = 32  # scored completions per optimizer step, every method (module docstring: "Budget")
    c.group_size = 4  # GRPO offline: the toy task's ranked groups
    c.num_generations = 8  # GRPO online: G
    c.pair_lr = 1e-4  # DPO's configs/dpo.py value, also for ORPO
    c.noise = 0.3
    c.sft_steps = 0  # 0 = configs/sft.py's default (400)
    c.eval_prompts = 100  # the first 100 of the 300 held-out prompts (the evaluation is a large part of each run)
    c.eval_pairs = 0  # 0 = all 300 held-out pairs
    c.kl_prompts = 50
    c.kl_samples = 4
    c.kl_tokens = 12  # configs/grpo.py's max_completion_length
    if arg == "tiny":  # the RL path (RM + PPO, sampling), the pairwise one, and one noisy run
        c.methods = ("RLHF", "DPO")
        c.noisy_methods = ("DPO",)
        c.seeds = (0,)
        c.steps = 4  # one PPO rollout
        c.completions = 8
        c.num_generations = 2
        c.sft_steps = 2
        c.eval_prompts = 8
        c.eval_pairs = 32
        c.kl_prompts = 4
        c.kl_samples = 2
    elif arg:
        raise UserError(f"unknown size {arg!r}; use '' or 'tiny'")
    return c


# --------------------------------------------------------------------------------------------- noisy data


def flip_indices(n: int, frac: float, seed: int) -> np.ndarray:
    """The items to flip, sorted: exactly round(frac·n), the first of a permutation drawn from `seed`
    (experiments/label_noise.py's draw)."""
    if not 0.0 <= frac < 0.5:
        raise UserError(f"noise {frac} must be in [0, 0.5) (at 0.5 the labels carry no information)")
    perm = np.random.default_rng([FLIP_SALT, seed]).permutation(n)
    return np.sort(perm[:round(frac * n)])


def reverse_ranks(ranks) -> list[int]:
    """The reversed ranking of a group (0 = best, ties share a rank): rank_i -> the number of responses ranked worse
    than i, so the worst become the best and ties stay tied."""
    return [sum(r2 > r for r2 in ranks) for r in ranks]


def noisy_records(kind: str, records: list[dict], idx) -> list[dict]:
    """Copies of `records` with the items at `idx` flipped: pairs (chosen <-> rejected), soft pairs (chosen_prob
    p -> 1 - p, texts kept) or ranked groups (ranking reversed)."""
    out = [dict(r) for r in records]
    for i in idx:
        r = out[i]
        if kind == "pairs":
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        elif kind == "pairs_soft":
            r["chosen_prob"] = 1.0 - float(r["chosen_prob"])
        elif kind == "groups_ranked":
            r["ranks"] = reverse_ranks(r["ranks"])
        else:
            raise ValueError(kind)
    return out


def noisy_file(wd: str, kind: str, frac: float, seed: int) -> tuple[str, int]:
    """<wd>/noisy/<kind>_noise<frac>_seed<seed>.jsonl (written once) from the toy task's <kind>.jsonl; returns
    (path, number flipped)."""
    from align_jax.data.toy import read_jsonl

    path = os.path.join(wd, "noisy", f"{kind}_noise{frac:g}_seed{seed}.jsonl")
    records = read_jsonl(os.path.join(wd, "toy_data", f"{kind}.jsonl"))
    idx = flip_indices(len(records), frac, seed)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ab.write_jsonl_atomic(path, noisy_records(kind, records, idx))
    return path, len(idx)


# --------------------------------------------------------------------------------------------- FLOP count


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def _shape_key(args, kwargs):
    import jax

    def leaf(x):
        return (tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype") else repr(x)

    return repr(jax.tree.map(leaf, (args, kwargs)))


_FLOP_CACHE: dict = {}  # (stage tag, kind, input shapes) -> (FLOPs, prefill FLOPs): the same program in every seed


class _Counted:
    """A jitted function that adds XLA's FLOP count of each call to `counter[kind]` (one cost analysis per input
    shape). For the sampler, XLA counts its decode while-loop's body once: the count is then prefill + decode steps
    x (whole program − prefill), with the decode steps the sampler returns."""

    def __init__(self, fn, kind: str, counter: dict):
        self.fn, self.kind, self.counter = fn, kind, counter
        self.cache = _FLOP_CACHE

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def _flops(self, args, kwargs):
        key = (self.counter["tag"], self.kind, _shape_key(args, kwargs))
        if key not in self.cache:
            t = time.perf_counter()
            total = _cost_flops(self.fn.lower(*args, **kwargs).compile())
            prefill = _prefill_flops(*args, **kwargs) if self.kind == "sampler" else 0.0
            self.cache[key] = (total, prefill)
            self.counter["seconds"] += time.perf_counter() - t
        return self.cache[key]

    def __call__(self, *args, **kwargs):
        total, prefill = self._flops(args, kwargs)
        out = self.fn(*args, **kwargs)
        if self.kind == "sampler":
            steps = int(out.num_steps)
            self.counter["decode_steps"] += steps
            flops = prefill + steps * (total - prefill)
        else:
            flops = total
        self.counter[self.kind] += flops
        return out


def _prefill_flops(graphdef, state, ids_BxP, mask_BxP, rng, knobs, *, static, mesh, transposed=False) -> float:
    """XLA's FLOPs of the sampler's prompt pass alone (the model over the prompts, filling the KV cache)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from align_jax.models.llama import init_cache

    N = static[0]

    def prefill(state, ids, mask):
        model = nnx.merge(graphdef, state)
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        cache = init_cache(model.config, ids.shape[0], ids.shape[1] + N)
        h, cache = model(ids, mask, pos, cache=cache, return_hidden=True)
        return h[:, -1], cache

    return _cost_flops(jax.jit(prefill).lower(state, ids_BxP, mask_BxP).compile())


@contextlib.contextmanager
def flop_counter(tag: str = ""):
    """While active, the training loop's train steps and the rollouts' jitted programs add their FLOPs (XLA's cost
    analysis) to the yielded dict {kind: FLOPs, "decode_steps": n, "seconds": time spent counting}. (A hook in the
    library's loop would make this unnecessary: align_jax/train/loop.py could log `train_flops` per step.)"""
    loop = importlib.import_module("align_jax.train.loop")
    gen = importlib.import_module("align_jax.sampling.generate")
    rollout = importlib.import_module("align_jax.rl.rollout")
    ppo = importlib.import_module("align_jax.algorithms.ppo")
    counter = {k: 0.0 for k in FLOP_KINDS}
    counter.update(decode_steps=0, seconds=0.0, tag=tag)
    saved = (loop.jit_train_step, gen._generate_jit, rollout.completion_logps_jit, ppo.rollout_tensors)

    def jit_train_step(**kw):
        return _Counted(saved[0](**kw), "train_step", counter)

    loop.jit_train_step = jit_train_step
    gen._generate_jit = _Counted(saved[1], "sampler", counter)
    rollout.completion_logps_jit = _Counted(saved[2], "logps", counter)
    ppo.rollout_tensors = _Counted(saved[3], "ppo_rollout", counter)
    try:
        yield counter
    finally:
        loop.jit_train_step, gen._generate_jit, rollout.completion_logps_jit, ppo.rollout_tensors = saved


# --------------------------------------------------------------------------------------------- model calls


def model_calls(method: str, cfg) -> dict:
    """Forward calls (sequences through a model's forward; training forward + backward = one) and generated tokens
    (decode-step calls, at most N per sample) of one stage, from its config's shapes and steps (module docstring)."""
    S, B = cfg.total_steps, cfg.batch_size
    if method in ("DPO",):
        fwd = {"policy": S * 2 * B, "reference": S * 2 * B}
    elif method in ("ORPO",):
        fwd = {"policy": S * 2 * B}
    elif method == "RM":
        fwd = {"reward": S * 2 * B}
    elif method == "GRPO_offline":
        fwd = {"policy": S * B * cfg.data.group_size}
    elif method == "GRPO_online":
        G, N, K = cfg.grpo.num_generations, cfg.grpo.max_completion_length, cfg.grpo.num_iterations
        R = S // K  # rollouts
        fwd = {"policy": S * B * G + (R * B * G if K > 1 else 0), "prefill": R * B,
               "reference": 0 if cfg.loss.reference_free else R * B * G}
        return {"forward": fwd, "generated": R * B * G * N}
    elif method == "PPO":
        p = cfg.ppo
        K, N, M = p.num_ppo_epochs * p.num_mini_batches, p.response_length, B // p.num_mini_batches
        R = S // K
        fwd = {"prefill": R * B, "policy": R * B + S * M, "value": R * B + S * M, "reference": R * B,
               "reward": R * B}
        return {"forward": fwd, "generated": R * B * N}
    else:
        raise ValueError(method)
    return {"forward": fwd, "generated": 0}


def total_calls(calls: dict) -> int:
    return int(sum(calls["forward"].values()) + calls["generated"])


# --------------------------------------------------------------------------------------------- configs


def _base(name: str, seed: int, wd: str, sft_path: str, c):
    cfg = ab.load_config(name, wd, seed)
    cfg.model.init_from = sft_path
    cfg.total_steps = c.steps
    cfg.eval_every = 0
    cfg.eval_generation = 0
    cfg.progress_bar = False
    cfg.log_every = max(c.steps // 4, 1)
    cfg.checkpoint.every_steps = c.steps
    return cfg


def stage_configs(method: str, seed: int, wd: str, sft_path: str, c, train_file: str | None,
                  rm_path: str = "") -> object:
    """The config of one training stage (RLHF's reward model is "RM", its PPO stage "PPO")."""
    if method == "RM":
        cfg = _base("reward_model", seed, wd, sft_path, c)
        cfg.batch_size = c.completions // 2
        cfg.data.eval = os.path.join(wd, "toy_data", "eval_pairs.jsonl")  # its held-out accuracy, at the end
        if train_file:
            cfg.data.train = train_file
    elif method == "PPO":
        cfg = _base("ppo", seed, wd, sft_path, c)
        cfg.batch_size = c.completions
        cfg.ppo.reward_model = rm_path
        if c.steps % (cfg.ppo.num_ppo_epochs * cfg.ppo.num_mini_batches):
            raise UserError(f"steps={c.steps} must be a multiple of PPO's "
                            f"{cfg.ppo.num_ppo_epochs * cfg.ppo.num_mini_batches} steps per rollout")
    elif method in ("DPO", "ORPO"):
        cfg = _base(method.lower(), seed, wd, sft_path, c)
        cfg.batch_size = c.completions // 2
        cfg.data.eval = ""
        cfg.data.max_length = 64
        cfg.data.length_buckets = (32, 48, 64)
        cfg.optimizer.learning_rate = c.pair_lr
        cfg.optimizer.schedule = "linear"
        if method == "DPO":  # a live reference (TRL's default): its forward is in the step's FLOPs and model calls
            cfg.reference.precompute = False
        if train_file:
            cfg.data.train = train_file
    elif method == "GRPO_online":
        cfg = _base("grpo", seed, wd, sft_path, c)
        cfg.grpo.num_generations = c.num_generations
        cfg.batch_size = c.completions // c.num_generations
        cfg.grpo.log_completions_every = 0
    elif method == "GRPO_offline":
        from align_jax.cli import load_config_file

        cfg = _base("grpo", seed, wd, sft_path, c)
        off = load_config_file(os.path.join(ab.ROOT, "configs", "grpo.py") + ":offline")
        for key in ("algorithm",):
            cfg[key] = off[key]
        cfg.loss.reference_free = off.loss.reference_free
        cfg.data.kind, cfg.data.train, cfg.data.group_size = off.data.kind, off.data.train, c.group_size
        cfg.data.max_prompt_length, cfg.data.max_length = off.data.max_prompt_length, off.data.max_length
        cfg.data.length_buckets = off.data.length_buckets
        cfg.batch_size = c.completions // c.group_size
        if train_file:
            cfg.data.train = train_file
    else:
        raise ValueError(method)
    return cfg


# --------------------------------------------------------------------------------------------- measurements


def roughness(losses) -> float:
    """RMS of the training loss around its centred 5-step moving average, divided by its drop (mean of the first 5
    steps − mean of the last 5): noise per unit of progress (lower = smoother). inf when the loss did not drop."""
    x = np.asarray(losses, np.float64)
    if len(x) < 10:
        return float("nan")
    k = 5
    smooth = np.convolve(x, np.ones(k) / k, mode="valid")
    resid = x[k // 2:len(x) - k // 2] - smooth
    drop = x[:k].mean() - x[-k:].mean()
    return float(np.sqrt(np.mean(resid**2)) / drop) if drop > 0 else float("inf")


def steady_seconds(run_dir: str) -> float:
    """The run's steady-state training time: the mean wall time of its steps after the first (the loop's
    `step_seconds`: from one step's completion to the next, rollouts included; the first step also compiles)
    times its number of steps. Setup, compilation, data building and checkpoints are left out."""
    rows, _ = tp.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    later = [float(r["step_seconds"]) for r in rows if r["step"] >= 2 and "step_seconds" in r]
    return float(np.mean(later)) * len(rows) if later else float("nan")


def kl_to_sft(policy_path: str, sft_path: str, toy_dir: str, c, seed: int) -> float:
    """E_{x, y~π}[log π(y|x) − log π_SFT(y|x)]: `kl_samples` temperature-1 samples per held-out prompt (the first
    `kl_prompts`), both log-probs from one full forward (`completion_logps_jit`), summed over the completion."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from align_jax.data.toy import read_jsonl
    from align_jax.evaluation.policy import prompt_ids
    from align_jax.models import load_pretrained
    from align_jax.models.logps import completion_logps_jit
    from align_jax.sampling import Sampler

    tok = AutoTokenizer.from_pretrained(policy_path)
    prompts = [r["prompt"] for r in read_jsonl(os.path.join(toy_dir, "eval_prompts.jsonl"))][:c.kl_prompts]
    ids = [prompt_ids(tok, p) for p in prompts]
    P, N = max(len(x) for x in ids), c.kl_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    arr, mask = np.full((len(ids), P), pad, np.int32), np.zeros((len(ids), P), np.int32)
    for i, x in enumerate(ids):
        arr[i, P - len(x):], mask[i, P - len(x):] = x, 1
    policy, sft = load_pretrained(policy_path), load_pretrained(sft_path)
    out = Sampler(max_new_tokens=N, temperature=1.0, eos_ids=(tok.eos_token_id,), pad_id=pad,
                  num_generations=c.kl_samples)(policy, arr, mask, rng=jax.random.key(1000 + seed))
    full_ids = np.concatenate([np.asarray(out.prompt_ids), np.asarray(out.completion_ids)], 1)
    cmask = np.asarray(out.completion_mask)
    attn = np.concatenate([np.asarray(out.prompt_mask), cmask], 1)
    seq = []
    for model in (policy, sft):
        g, params, rest = nnx.split(model, nnx.Param, ...)
        lp = completion_logps_jit(g, params, rest, full_ids, attn, num_completion_tokens=N, temperature=1.0,
                                  chunk_size=8192)
        seq.append((np.asarray(lp, np.float64) * cmask).sum(1))
    return float(np.mean(seq[0] - seq[1]))


def calibration_scores(method: str, export: str, sft_path: str, rm_export: str, toy_dir: str, data_dir: str,
                       beta: float) -> dict:
    """The method's implied probability that the chosen response of each held-out pair is preferred
    (`align_jax.evaluation.calibration`: RLHF its reward model's σ(r_w − r_l), DPO σ(β·Δ log-ratio to the SFT
    reference), ORPO σ(Δ log-odds)) against the toy task's true preference probability σ((gold_w − gold_l)/1.5):
    {"prob_error", "ece"}; NaN for methods that imply none (GRPO)."""
    if method not in ("RLHF", "DPO", "ORPO"):
        return {"prob_error": float("nan"), "ece": float("nan")}
    from transformers import AutoTokenizer

    from align_jax.data import build_dataset, make_loader
    from align_jax.data.toy import read_jsonl
    from align_jax.data.toy.datasets import bt_prob
    from align_jax.data.toy.scoring import gold_reward
    from align_jax.evaluation import calibration
    from align_jax.evaluation.policy import pair_reward_scores, pair_sequence_logps
    from align_jax.models import load_pretrained

    path = os.path.join(toy_dir, "eval_pairs.jsonl")
    true = np.array([bt_prob(gold_reward(r["prompt"], r["chosen"]) - gold_reward(r["prompt"], r["rejected"]))
                     for r in read_jsonl(path)])
    tok = AutoTokenizer.from_pretrained(export)

    def loader():
        builder, _ = build_dataset(path, kind="pairwise", data_dir=data_dir)
        return make_loader(builder.as_data_source("train"), tok, kind="pairwise", batch_size=100, shuffle=False,
                           num_epochs=1, drop_remainder=False, max_length=128, length_buckets=(64, 128))[0]

    if method == "RLHF":
        from align_jax.rl.reward_model import load_reward_model

        p_hat = calibration.bt_probs(*pair_reward_scores(load_reward_model(rm_export), loader()))
    else:
        pol = pair_sequence_logps(load_pretrained(export), loader())
        if method == "DPO":
            ref = pair_sequence_logps(load_pretrained(sft_path), loader())
            p_hat = calibration.dpo_probs(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"], beta)
        else:
            p_hat = calibration.orpo_probs(pol["chosen"] / pol["chosen_tokens"],
                                           pol["rejected"] / pol["rejected_tokens"])
    m = calibration.calibration_metrics(p_hat, true)
    return {"prob_error": m["prob_error"], "ece": m["ece"]}


def eval_dir(wd: str, c) -> str:
    """The toy directory the evaluation reads: <wd>/toy_data, or a copy with the first `eval_pairs` held-out pairs."""
    from align_jax.data.toy import read_jsonl

    toy = os.path.join(wd, "toy_data")
    if not c.eval_pairs:
        return toy
    out = os.path.join(wd, f"eval_data_{c.eval_pairs}")
    if not os.path.exists(os.path.join(out, "eval_pairs.jsonl")):
        os.makedirs(out, exist_ok=True)
        ab.write_jsonl_atomic(os.path.join(out, "eval_prompts.jsonl"),
                              read_jsonl(os.path.join(toy, "eval_prompts.jsonl")))
        ab.write_jsonl_atomic(os.path.join(out, "eval_pairs.jsonl"),
                              read_jsonl(os.path.join(toy, "eval_pairs.jsonl"))[:c.eval_pairs])
    return out


# --------------------------------------------------------------------------------------------- runs


def train_stage(name: str, cfg, run_dir: str) -> dict:
    """`train(cfg, run_dir)` with the FLOP count; returns {seconds, flops by kind, decode steps, resumed}."""
    from align_jax.train import train

    resumed = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    print(f"[{name}] training {cfg.algorithm} ({cfg.loss.name}) {cfg.total_steps} steps x {cfg.batch_size} on "
          f"{cfg.data.train} -> {run_dir}", flush=True)
    t = time.perf_counter()
    tag = repr((cfg.algorithm, cfg.loss.name, cfg.batch_size))  # the same programs in every seed and noise
    with flop_counter(tag) as n:
        train(cfg, run_dir)
    seconds = time.perf_counter() - t - n["seconds"]
    return {"seconds": seconds, **{f"flops_{k}": n[k] for k in FLOP_KINDS}, "decode_steps": n["decode_steps"],
            "resumed": resumed}


def _signature(method, cfg, c, noise) -> dict:
    return {"method": method, "algorithm": cfg.algorithm, "loss": cfg.loss.name, "steps": c.steps,
            "batch_size": cfg.batch_size, "lr": cfg.optimizer.learning_rate, "train": cfg.data.train,
            "noise": noise, "sft_steps": c.sft_steps, "sft_seed": FLAGS.seed, "eval_prompts": c.eval_prompts,
            "eval_pairs": c.eval_pairs, "kl": [c.kl_prompts, c.kl_samples, c.kl_tokens],
            **({"reference": "live"} if method == "DPO" else {})}


def one_run(method: str, noise: float, seed: int, wd: str, sft_path: str, c) -> dict:
    """Trains (every stage of) one method at one noise level and seed, evaluates it; cached (ab.cached_run)."""
    name = f"{method}_noise{noise:g}_seed{seed}"
    rd = os.path.join(wd, "runs", name)
    flipped = 0
    stages = []
    if method == "RLHF":
        file = None
        if noise:
            file, flipped = noisy_file(wd, "pairs_soft", noise, seed)
        rm_cfg = stage_configs("RM", seed, wd, sft_path, c, file)
        rm_dir = os.path.join(rd, "reward_model")
        rm = ab.cached_run(rm_dir, _signature("RM", rm_cfg, c, noise),
                           lambda: {**train_stage(name + "/RM", rm_cfg, rm_dir),
                                    "accuracy": _rm_accuracy(rm_dir)})
        cfg = stage_configs("PPO", seed, wd, sft_path, c, None, os.path.join(rm_dir, "export"))
        stages = [("RM", rm_cfg, rm)]
        stage_name = "PPO"
    else:
        file = None
        if noise and method != "GRPO_online":
            kind = "groups_ranked" if method == "GRPO_offline" else "pairs"
            file, flipped = noisy_file(wd, kind, noise, seed)
        cfg = stage_configs(method, seed, wd, sft_path, c, file)
        stage_name = method

    def compute():
        res = train_stage(name, cfg, rd)
        toy_dir, data_dir = eval_dir(wd, c), os.path.join(wd, "tfds")
        export = os.path.join(rd, "export")
        scores = tp.evaluate_policy(export, toy_dir, c.eval_prompts, data_dir)
        kl = kl_to_sft(export, sft_path, toy_dir, c, seed)
        cal = calibration_scores(method, export, sft_path, os.path.join(rd, "reward_model", "export"), toy_dir,
                                 data_dir, cfg.loss.kwargs.get("beta", 0.1))
        rows, _ = tp.read_metrics(os.path.join(rd, "metrics.jsonl"))
        losses = [float(r["loss"]) for r in rows]
        return {**res, **{k: scores[k] for k, _, _ in AXES}, "kl": kl, "roughness": roughness(losses),
                "final_loss": float(np.mean(losses[-5:])) if losses else float("nan"), **cal}

    res = dict(ab.cached_run(rd, _signature(method, cfg, c, noise), compute))
    all_stages = stages + [(stage_name, cfg, res)]
    calls = [model_calls(m, sc) for m, sc, _ in all_stages]
    row = {"method": method, "noise": noise, "seed": seed, "run": name, "flipped": flipped,
           **{k: res[k] for k, _, _ in AXES}, "kl": res["kl"], "roughness": res["roughness"],
           "final_loss": res["final_loss"], "prob_error": res.get("prob_error", float("nan")),
           "ece": res.get("ece", float("nan")),
           "seconds": sum(r["seconds"] for _, _, r in all_stages),
           "step_seconds": steady_seconds(rd) + (steady_seconds(os.path.join(rd, "reward_model")) if stages else 0.0),
           "resumed": any(r["resumed"] for _, _, r in all_stages),
           "decode_steps": sum(r["decode_steps"] for _, _, r in all_stages),
           "forward_calls": sum(sum(x["forward"].values()) for x in calls),
           "generated_tokens": sum(x["generated"] for x in calls),
           "model_calls": sum(total_calls(x) for x in calls),
           "rm_accuracy": stages[0][2]["accuracy"] if stages else ""}
    for k in FLOP_KINDS:
        row[f"flops_{k}"] = sum(r[f"flops_{k}"] for _, _, r in all_stages)
    row["train_flops"] = sum(row[f"flops_{k}"] for k in FLOP_KINDS)
    print(f"[{name}] gold reward {row['gold_reward']:.3f}, KL {row['kl']:.3f}, {row['seconds']:.0f}s, "
          f"{row['train_flops']:.3g} FLOPs, {row['model_calls']} model calls", flush=True)
    return row


def _rm_accuracy(rm_dir: str):
    _, evals = tp.read_metrics(os.path.join(rm_dir, "metrics.jsonl"))
    return evals[-1].get("eval/accuracy") if evals else None


# --------------------------------------------------------------------------------------------- summaries


def aggregate(rows: list[dict]) -> dict:
    """{(method, noise): {metric: (mean, sample std, n), "seeds": {seed: row}}}."""
    return ab.aggregate(rows, ("method", "noise"), tuple(k for k, _, _ in METRICS) + ("roughness", "prob_error",
                                                                                       "ece"))


def compare(a, b) -> str:
    """'lower' / 'higher' when a's ± 1 std interval lies below / above b's, else 'not distinguishable'."""
    (m1, s1, _), (m2, s2, _) = a, b
    if m1 + s1 < m2 - s2:
        return "lower"
    if m1 - s1 > m2 + s2:
        return "higher"
    return "not distinguishable"


def _v(agg, m, noise, key):
    return agg.get((m, float(noise)), {}).get(key)


def _s(ms, digits=3) -> str:
    """'mean ± std' (3 significant digits from 10^4 on)."""
    if ms is None or ms[2] == 0:
        return "—"
    mean, std, n = ms
    if digits == 0 and np.isfinite(mean):
        return f"{mean:.0f}" + (f" ± {std:.0f}" if n > 1 and std > 0 else "" if n > 1 else " (1 seed)")
    if abs(mean) >= 1e4 and np.isfinite(mean):
        return f"{mean:.3g} ± {std:.2g}" if n > 1 else f"{mean:.3g} (1 seed)"
    return ab.fmt(ms, digits) + ("" if n > 1 else " (1 seed)")


def drop(agg, method, key, noise) -> tuple[float, float, int] | None:
    """clean − noisy of `key` per seed: (mean, sample std, seeds)."""
    a, b = agg.get((method, 0.0)), agg.get((method, float(noise)))
    if a is None or b is None or not noise:
        return None
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    d = np.array([float(a["seeds"][s][key]) - float(b["seeds"][s][key]) for s in seeds])
    if not len(d):
        return None
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0, len(d)


def verdicts(agg: dict, c) -> list[str]:
    """Per claim one line "holds / does not hold / not distinguishable here" with the numbers (module docstring)."""
    ms = [m for m in c.methods if (m, 0.0) in agg]
    g = {m: agg[(m, 0.0)]["gold_reward"] for m in ms}
    out = []

    def line(claim, status, numbers):
        out.append(f"- {claim}: **{status}** here ({numbers}).")

    def best(key, largest=True):
        vals = {m: agg[(m, 0.0)][key] for m in ms}
        order = sorted(ms, key=lambda m: vals[m][0], reverse=largest)
        return order, vals

    if "RLHF" in ms and len(ms) > 1:
        others = [m for m in ms if m != "RLHF"]
        keys = ("seconds", "train_flops", "model_calls")
        top = [k for k in keys if all(agg[("RLHF", 0.0)][k][0] > agg[(m, 0.0)][k][0] for m in others)]
        nums = "; ".join(f"{k}: RLHF {_s(agg[('RLHF', 0.0)][k], DIGITS.get(k, 3))} vs " +
                         ", ".join(f"{m} {_s(agg[(m, 0.0)][k], DIGITS.get(k, 3))}" for m in others) for k in keys)
        status = ("holds" if len(top) == len(keys) else
                  f"partly holds (the largest in {', '.join(top)} only)" if top else "does not hold")
        line("RLHF \"expensive\" (the largest seconds, FLOPs and model calls)", status, nums)
        order, _ = best("gold_reward")
        cmp = [compare(g["RLHF"], g[m]) for m in others]
        status = ("holds" if all(x == "higher" for x in cmp) else
                  "does not hold" if any(x == "lower" for x in cmp) or order[0] != "RLHF" and
                  all(x != "higher" for x in cmp) and compare(g["RLHF"], g[order[0]]) == "lower" else
                  "not distinguishable")
        if status == "not distinguishable" and order[0] != "RLHF":
            status = "does not hold (not the highest mean; within ± 1 std of some)"
        line("RLHF \"maximum alignment control\" (read as: highest gold reward)", status,
             "gold reward " + ", ".join(f"{m} {_s(g[m])}" for m in order))
    if "DPO" in ms:
        line("DPO \"simple\"", "holds (structural)", "one stage, 2 models, no sampling; RLHF: 2 stages, 4 models, "
             "sampling; GRPO online: sampling + reward per step")
        rivals = [m for m in ("RLHF", "GRPO_online") if m in ms]
        if rivals:
            fast = all(agg[("DPO", 0.0)]["seconds"][0] < agg[(m, 0.0)]["seconds"][0] for m in rivals)
            line("DPO \"fast\" (fewer seconds than the RL methods)", "holds" if fast else "does not hold",
                 "seconds DPO " + _s(agg[("DPO", 0.0)]["seconds"], 1) + ", " +
                 ", ".join(f"{m} {_s(agg[(m, 0.0)]['seconds'], 1)}" for m in ms if m != "DPO") +
                 "; steady-state DPO " + _s(agg[("DPO", 0.0)]["step_seconds"], 1) + ", " +
                 ", ".join(f"{m} {_s(agg[(m, 0.0)]['step_seconds'], 1)}" for m in ms if m != "DPO"))
        stds = {m: g[m][1] for m in ms}
        if len(ms) > 1 and g["DPO"][2] > 1:
            med = float(np.median([stds[m] for m in ms if m != "DPO"]))
            line("DPO \"stable\" (seed std of gold reward <= the others' median)",
                 "holds" if stds["DPO"] <= med else "does not hold",
                 f"std DPO {stds['DPO']:.3f}, median of the others {med:.3f}; " +
                 ", ".join(f"{m} {stds[m]:.3f}" for m in ms if m != "DPO"))
    if "ORPO" in ms and "DPO" in ms:
        r = {m: agg[(m, 0.0)]["roughness"] for m in ("ORPO", "DPO")}
        cmp = compare(r["ORPO"], r["DPO"])
        line("ORPO \"smooth training\" (loss roughness below DPO's)",
             {"lower": "holds", "higher": "does not hold"}.get(cmp, "not distinguishable"),
             f"roughness ORPO {_s(r['ORPO'])}, DPO {_s(r['DPO'])}")
        if c.noise:
            d = {m: drop(agg, m, "gold_reward", c.noise) for m in ("ORPO", "DPO")}
            if all(v is not None for v in d.values()):
                cmp = compare(d["ORPO"], d["DPO"])
                others = ", ".join(f"{m} {_s(drop(agg, m, 'gold_reward', c.noise))}" for m in ms
                                   if m not in ("ORPO", "DPO") and drop(agg, m, "gold_reward", c.noise))
                line(f"ORPO \"robust to noise\" (gold-reward drop at {c.noise:.0%} flips smaller than DPO's)",
                     {"lower": "holds", "higher": "does not hold"}.get(cmp, "not distinguishable"),
                     f"drop ORPO {_s(d['ORPO'])}, DPO {_s(d['DPO'])}" + (f"; {others}" if others else ""))
        e = {m: _v(agg, m, 0, "ece") for m in ("ORPO", "DPO", "RLHF") if m in ms}
        if e.get("ORPO") and e.get("DPO") and e["ORPO"][2] and e["DPO"][2]:
            cmp = compare(e["ORPO"], e["DPO"])
            line("ORPO \"calibrated preference probabilities\" (its σ(log odds ratio) closer to the true preference "
                 "probability of held-out pairs than DPO's implicit σ(β·Δ log-ratio): lower ECE)",
                 {"lower": "holds", "higher": "does not hold"}.get(cmp, "not distinguishable"),
                 f"ECE ORPO {_s(e['ORPO'])}, DPO {_s(e['DPO'])}" +
                 (f"; RLHF's reward model (trained on the soft labels) {_s(e['RLHF'])}" if e.get("RLHF") and
                  e["RLHF"][2] else "") +
                 f"; mean |p̂ − p| ORPO {_s(_v(agg, 'ORPO', 0, 'prob_error'))}, "
                 f"DPO {_s(_v(agg, 'DPO', 0, 'prob_error'))}")
    grpo = [m for m in ("GRPO_online", "GRPO_offline") if m in ms]
    if grpo and "DPO" in ms:
        cmps = {m: compare(g[m], g["DPO"]) for m in grpo}
        status = ("holds" if all(v == "higher" for v in cmps.values()) else
                  "does not hold" if all(v == "lower" for v in cmps.values()) else
                  "mixed: " + ", ".join(f"{m} {v}" for m, v in cmps.items()))
        line("GRPO \"more expressive signal per step\" (higher gold reward than DPO at equal steps and completions)",
             status, "gold reward " + ", ".join(f"{m} {_s(g[m])}" for m in grpo + ["DPO"]))
    if "GRPO_online" in ms and "DPO" in ms:
        a, b = agg[("GRPO_online", 0.0)], agg[("DPO", 0.0)]
        more = all(a[k][0] > b[k][0] for k in ("train_flops", "seconds"))
        line("GRPO \"computationally more intensive\" (online GRPO's FLOPs and seconds above DPO's)",
             "holds" if more else "does not hold",
             f"FLOPs {_s(a['train_flops'])} vs {_s(b['train_flops'])}; seconds {_s(a['seconds'], 1)} vs "
             f"{_s(b['seconds'], 1)} (steady-state {_s(a['step_seconds'], 1)} vs {_s(b['step_seconds'], 1)})" + (f"; offline GRPO {_s(agg[('GRPO_offline', 0.0)]['train_flops'])} FLOPs, "
                                         f"{_s(agg[('GRPO_offline', 0.0)]['seconds'], 1)} s"
                                         if ("GRPO_offline", 0.0) in agg else ""))
    return out


def markdown(agg: dict, sft: dict, c, seconds: float) -> str:
    ms = [m for m in c.methods if (m, 0.0) in agg]
    seeds = ", ".join(map(str, c.seeds))
    lines = ["# The four techniques, measured on the toy task", "",
             f"Shared SFT start (seed {FLAGS.seed if FLAGS.is_parsed() else 0}); every method {c.steps} optimizer steps of {c.completions} "
             f"scored completions (RLHF: + a reward model of {c.steps} steps x {c.completions // 2} pairs). Mean ± "
             f"sample std over seeds {seeds}. Evaluated on {c.eval_prompts} held-out prompts (greedy); KL on "
             f"{c.kl_prompts} x {c.kl_samples} temperature-1 samples. Wall time of this invocation {seconds:.0f} s "
             "(finished runs are read back, not rerun).", "",
             "## The description's table with the measured columns", "",
             "| technique | complexity | strengths | drawbacks | gold reward | KL to SFT | seconds | train FLOPs | "
             "model calls | gold reward, 30% flipped | preference-probability ECE |".replace("30%", f"{c.noise:.0%}"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ms:
        cx, st, dr = WORDS[m]
        noisy = _s(_v(agg, m, c.noise, "gold_reward")) if c.noise and HAS_LABELS[m] else "no labels"
        lines.append(f"| {LABELS[m]} | {cx} | {st} | {dr} | {_s(_v(agg, m, 0, 'gold_reward'))} | "
                     f"{_s(_v(agg, m, 0, 'kl'))} | {_s(_v(agg, m, 0, 'seconds'), 1)} | "
                     f"{_s(_v(agg, m, 0, 'train_flops'))} | {_s(_v(agg, m, 0, 'model_calls'), 0)} | {noisy} | "
                     f"{_s(_v(agg, m, 0, 'ece'))} |")
    lines.append(f"| SFT (start) | — | — | — | {sft['gold_reward']:.3f} | 0 | — | — | — | — | — |")
    lines += ["", "## Claims", ""] + verdicts(agg, c) + [""]
    for noise in ([0.0, c.noise] if c.noise else [0.0]):
        title = "clean labels" if not noise else f"{noise:.0%} of the preference labels flipped"
        lines += [f"## Every column, {title}", "",
                  "| method | " + " | ".join(label for _, label, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for m in ms:
            if noise and m not in c.noisy_methods:
                continue
            lines.append(f"| {LABELS[m]} | " + " | ".join(
                _s(_v(agg, m, noise, k), DIGITS.get(k, 3)) for k, _, _ in METRICS) + " |")
        if not noise:
            lines.append("| SFT (start) | " + " | ".join(
                f"{sft[k]:.3f}" if k in sft else ("0" if k == "kl" else "—") for k, _, _ in METRICS) + " |")
        lines.append("")
    lines += ["Train FLOPs: XLA's cost analysis of every compiled train step (and for the online methods the "
              "sampler, the reference / old-policy forwards and PPO's rollout pass) times its calls; RLHF includes "
              "its reward model. Model calls: sequences through a model's forward plus generated tokens, from the "
              "configs' shapes (docstring of experiments/compare_techniques.py). Seconds: `train()` of every stage, "
              "without the evaluation and the shared SFT stage. GRPO online has no labels, so no noisy run. "
              "Preference-probability ECE: on the held-out pairs, the probability the method implies that the chosen "
              "response wins (RLHF: its reward model's σ(r_w − r_l); DPO: σ(β·Δ log π/π_SFT); ORPO: σ(Δ log odds)) "
              "against the toy task's true σ((gold_w − gold_l)/1.5), 10 bins (align_jax.evaluation.calibration); "
              "GRPO implies none.", ""]
    return "\n".join(lines)


def plot(agg: dict, sft: dict, c, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [m for m in c.methods if (m, 0.0) in agg]
    fig, axes = plt.subplots(3, 4, figsize=(17, 11))
    for ax in axes.flat[len(METRICS):]:
        ax.axis("off")
    x = np.arange(len(ms))
    noises = [0.0] + ([c.noise] if c.noise else [])
    w = 0.8 / len(noises)
    for ax, (key, label, higher) in zip(axes.flat, METRICS):
        for j, noise in enumerate(noises):
            vals = [_v(agg, m, noise, key) for m in ms]
            mean = [v[0] if v else np.nan for v in vals]
            std = [v[1] if v else 0.0 for v in vals]
            ax.bar(x + (j - (len(noises) - 1) / 2) * w, mean, w, yerr=std, capsize=3,
                   label="clean labels" if not noise else f"{noise:.0%} labels flipped")
        if key in sft:
            ax.axhline(sft[key], color="gray", ls="--", lw=1, label="SFT start")
        ax.set_xticks(x, [SHORT[m] for m in ms], fontsize=8)
        ax.set_xlabel("method")
        ax.set_ylabel(label + ("" if higher else " ↓"), fontsize=8)
        if key in ("train_flops", "model_calls", "seconds", "step_seconds"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=6)
    fig.suptitle(f"Four techniques on the toy task from one SFT model: {c.steps} steps x {c.completions} "
                 f"completions each; error bars = ± std over {len(c.seeds)} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def config_from_flags():
    c = get_config(FLAGS.size)
    if FLAGS.methods:
        unknown = [m for m in FLAGS.methods if m not in METHODS]
        if unknown:
            raise UserError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        c.methods = tuple(FLAGS.methods)
        c.noisy_methods = tuple(m for m in c.noisy_methods if m in c.methods)
    if FLAGS.seeds:
        c.seeds = tuple(int(s) for s in FLAGS.seeds)
    if FLAGS.steps:
        if FLAGS.steps < 1:
            raise UserError(f"--steps must be >= 1, got {FLAGS.steps}")
        c.steps = FLAGS.steps
    if FLAGS.noisy_methods is not None:
        bad = [m for m in FLAGS.noisy_methods if m not in c.methods or not HAS_LABELS[m]]
        if bad:
            raise UserError(f"--noisy_methods: {bad} not among the run's methods with labels")
        c.noisy_methods = tuple(FLAGS.noisy_methods)
    if FLAGS.noise is not None:
        c.noise = FLAGS.noise
    flip_indices(10, c.noise, 0)  # validates the noise
    if FLAGS.sft_steps:
        c.sft_steps = FLAGS.sft_steps
    if FLAGS["eval_prompts"].present:
        c.eval_prompts = FLAGS.eval_prompts
    if c.completions % 2 or c.completions % c.group_size or c.completions % c.num_generations:
        raise UserError(f"completions={c.completions} must split into pairs, groups of {c.group_size} and "
                        f"{c.num_generations} samples")
    return c


def run(c, wd: str, report_only: bool = False, jobs: int = 0) -> dict:
    t0 = time.time()
    os.makedirs(wd, exist_ok=True)
    sft_path = tp.sft_stage(wd, c.sft_steps)
    sft_file = os.path.join(wd, f"sft_eval_{c.eval_prompts}_{c.eval_pairs}.json")
    if os.path.exists(sft_file):
        with open(sft_file) as f:
            sft = json.load(f)
    else:
        sft = tp.evaluate_policy(sft_path, eval_dir(wd, c), c.eval_prompts, os.path.join(wd, "tfds"))
        ab.write_json_atomic(sft_file, sft)
    if jobs != 1 and not report_only:
        ab.parallel_cells(jobs, wd)  # the grid's cells, cached: the loop below reads them
    rows, missing = [], []
    cells = [(noise, seed, m) for noise in ([0.0, c.noise] if c.noise else [0.0])  # clean first: an interrupted
             for seed in c.seeds for m in c.methods if not noise or m in c.noisy_methods]  # run has the clean table
    for k, (noise, seed, m) in enumerate(cells):
        if not ab.in_shard(k, FLAGS.shard):
            continue
        if report_only and not os.path.exists(os.path.join(wd, "runs", f"{m}_noise{noise:g}_seed{seed}",
                                                           "result.json")):
            missing.append(f"{m}_noise{noise:g}_seed{seed}")
            continue
        rows.append(one_run(m, noise, seed, wd, sft_path, c))
        if not FLAGS.shard:
            ab.write_csv(os.path.join(wd, "runs.csv"), rows, CSV_FIELDS)
    if FLAGS.shard:  # a child of --jobs: its cells are cached; the parent writes the report
        return {}
    agg = aggregate(rows)
    seconds = time.time() - t0
    md = markdown(agg, sft, c, seconds)
    if missing:
        md += f"\nNot finished (left out of the table): {', '.join(missing)}.\n"
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write(md + "\n")
    cells = [{"method": m, "noise": n, **{k: list(v[k]) for k, _, _ in METRICS}, "roughness": list(v["roughness"])}
             for (m, n), v in sorted(agg.items())]
    out = {"config": c.to_dict(), "seconds": seconds, "sft": {k: v for k, v in sft.items() if k != "samples"},
           "cells": cells, "verdicts": verdicts(agg, c), "command": ab.command_line(), "missing": missing}
    ab.write_json_atomic(os.path.join(wd, "results.json"), json.loads(json.dumps(out, default=float)))
    plot(agg, sft, c, os.path.join(wd, "results.png"))
    print(md + f"\n\n(total {seconds:.0f}s; {wd}/results.md, results.png, runs.csv)")
    return out


def main(argv):
    del argv
    from align_jax import cli

    cli.pin_threads(FLAGS.threads)
    cli.console(cli.verbose_from_env())
    ab.use_compile_cache(FLAGS.workdir)
    cli.run(lambda: run(config_from_flags(), FLAGS.workdir, FLAGS.report_only, FLAGS.jobs), cli.verbose_from_env())


if __name__ == "__main__":
    from absl import app

    app.run(main)
