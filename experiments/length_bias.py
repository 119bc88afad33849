"""Dr. GRPO's length bias on the toy task: length of correct and incorrect completions over online GRPO training
with the `grpo`, `dr_grpo` and `dapo` loss aggregations.

    python experiments/length_bias.py --workdir=/tmp/align_jax_length_bias          # default size, ~10 min
    python experiments/length_bias.py --workdir=/tmp/length_bias_tiny --size=tiny    # ~30-50 s (the test's size)
    python experiments/length_bias.py --workdir=... --aggregations=grpo,dr_grpo --seeds=0,1,2,3,4 --steps=150

Paper. Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO), §3.1 and
Fig. 1 (right: the length of incorrect responses over training, GRPO vs Dr. GRPO). GRPO's objective averages
each response's token losses over its own length, (1/|o_i|) Σ_t ℓ_it, and divides advantages by the group's reward
std. Claim: the 1/|o_i| factor is a response-level length bias: for a positive advantage a shorter response gets a
larger per-token update (short correct answers preferred), for a negative advantage a longer response gets a
smaller per-token penalty (long incorrect answers penalised less), so the lengths of incorrect responses keep
growing; Dr. GRPO (sum of token losses over a constant, no std normalisation) removes the bias and incorrect
responses do not grow.

The aggregations (align_jax/losses/grpo.py `grpo_loss`, TRL 1.x GRPOTrainer's `loss_type`; the project's plain
`grpo` loss name is TRL 1.x's default `dapo` aggregation, so the names are mapped explicitly):

    grpo     loss grpo:grpo     mean_i [Σ_t m ℓ / Σ_t m]   (per-response mean, then mean over responses)
             advantages (r − mean_group) / (std_group + 1e-4)               (grpo.scale_rewards = "group")
    dr_grpo  loss grpo:dr_grpo  Σ m ℓ / (B·N), N = grpo.max_completion_length (a constant: no length term)
             advantages r − mean_group                                      (grpo.scale_rewards = "none")
    dapo     loss grpo:dapo     Σ m ℓ / Σ m   (token-level mean over the whole batch: each token weighs the same)
             advantages (r − mean_group) / (std_group + 1e-4)               (DAPO keeps the std normalisation)

Toy variant where length can grow. The reward is the toy task's correctness alone (`toy_correctness`: 1 if the
answer extracted from the completion is right, else 0; 0 for the secret requests, where correctness does not
apply, so their groups have zero advantage): a binary, rule-based answer reward as in the paper's R1-Zero setting.
The default toy reward (gold) is not used because its format term (+0.5 only when the completion is exactly the
instructed format) penalises every extra token and would pin the length. Correctness does not: the answer is taken
from an exact format match, else the completion's *last* alphanumeric token, so tokens before the answer cost
nothing ("The answer is 7." and "7" are both correct; "... 7" after any preamble is correct). The completion cap
`grpo.max_completion_length` is raised from configs/grpo.py's 12 (toy answers are 2-8 tokens with EOS) to 32, so
completions can grow to 4x the longest toy answer; a completion that reaches 32 tokens without EOS counts with its
32 tokens (TRL's default, grpo.mask_truncated_completions False). No length penalty and no KL (β = 0, as the
paper and TRL's default). Lengths are in tokens of the toy tokenizer, EOS included.

Measurement. The reward function `length_logging_correctness` (this script; `config.rewards.functions =
("length_bias:length_logging_correctness",)`, bound to a per-run log file with `rewards.kwargs`) returns the
correctness of every sampled completion and appends one JSON line per rollout to <run>/lengths.jsonl: each
completion's length (`completion_ids`, EOS included) and correctness (null for secret requests). Per step the
script reports the mean length of the correct and of the incorrect completions of the benign (math and fact)
prompts. These are the training samples (temperature 1), one rollout per step (grpo.num_iterations 1): the same
samples the update sees, not a separate evaluation. The log is checked against the trainer's own
`completions/mean_length` of every step (metrics.jsonl), and an interrupted run truncates it to its last checkpoint
before resuming (the resumed rollouts are bit-identical: the sampler's key is fold_in(seed, step)).

Setting. One shared SFT stage (`toy_pipeline.sft_stage`, configs/sft.py, 400 steps from random init, seed --seed),
then for every aggregation x seed online GRPO (configs/grpo.py, algorithm grpo, `train(config, run_dir)`) from
the SFT export: `steps` steps of 8 prompts x G = 8 samples, temperature 1, AdamW lr 3e-4 constant (configs/grpo.py's
toy tuning), ε = 0.2, β = 0, no reference model (reference_free). The seed sets the GRPO prompt order and the
sampling; all three aggregations of one seed start from the same SFT model and see the same first rollout.
Summary per run: mean length of correct / incorrect completions over the first and the last `window` steps, the
change, the fraction correct. The claim is scored in three parts (`verdict`), on changes paired by seed (grpo's
minus dr_grpo's): do incorrect completions grow more under grpo, do they stay flat under dr_grpo, does grpo lengthen
incorrect completions relative to correct ones.

Default size: aggregations grpo, dr_grpo, dapo; seeds 0, 1, 2; 100 steps; window 10 steps; completion cap 32:
9 GRPO runs after the SFT stage. Time: the default command took 10 min 07 s end to end on one core of this 2-core
machine (2026-11-30; the other core ran another experiment), ~57 s per GRPO run.
`--size=tiny`: 2 aggregations (grpo, dr_grpo) x 2 seeds, 3 steps of 4 prompts x 2 samples, cap 16, SFT 2 steps
(numbers meaningless; the test's size).

Measured at the default size (results.md; mean ± std over seeds 0-2):

    length (tokens)  correct first  correct last  incorrect first  incorrect last  Δ incorrect   Δ correct
    grpo             4.49 ± 0.40    5.35 ± 0.40   4.75 ± 0.46      5.69 ± 0.53     0.94 ± 0.39   0.86 ± 0.22
    dr_grpo          4.54 ± 0.53    5.15 ± 0.55   4.86 ± 0.51      5.54 ± 0.49     0.68 ± 0.40   0.61 ± 0.73
    dapo             4.56 ± 0.53    5.42 ± 0.18   4.86 ± 0.51      5.68 ± 0.67     0.83 ± 0.38   0.86 ± 0.35
    accuracy of the samples: 0.17-0.18 (first 10 steps) -> 0.28 (last 10) for all three; no completion reached the
    32-token cap (nearly all are 2-8 tokens, the toy's formats; the longest 27)

Verdict: partly supported, and the effect is small. (1) Incorrect completions grow more under grpo than under
dr_grpo: by 0.26 ± 0.17 tokens over 100 steps (paired by seed; 0.11, 0.45, 0.22: larger in 3 of 3 seeds), ~5 % of
their length; dapo lies between (0.83 ± 0.38; grpo − dapo 0.12 ± 0.06). (2) Dr. GRPO does not stop incorrect
completions from growing: +0.68 ± 0.40 tokens under dr_grpo. (3) GRPO does not lengthen incorrect completions
relative to correct ones: correct ones grow about as much (grpo 0.86 ± 0.22, dr_grpo 0.61 ± 0.73); the paired
change of (incorrect − correct) is 0.01 ± 0.36, and at the end incorrect completions are 0.33 ± 0.39 tokens longer
than correct ones under grpo vs 0.39 ± 0.66 under dr_grpo. So on the toy task all three aggregations lengthen
every completion a little, grpo slightly more than the others, with no sign of the incorrect-vs-correct split the
paper reports: the sampled policy drifts towards the longer formats ("The answer is 12." instead of "12", which
correctness does not penalise; the fraction of benign completions of >= 6 tokens goes from 0.45-0.58 over the first
10 steps to 0.63-0.74 over the last 10, in every arm, correct and incorrect alike).

Why the toy shows little. With a 0/1 reward the advantages of a group sum to 0, so the 1/|o_i| factor moves the
length of the samples only where length and correctness are correlated (the paper's long, often truncated wrong
answers); here lengths are set by the format (2-8 tokens), nearly independent of correctness (incorrect completions
are 0.3 tokens longer at the start), and the policy moves little in 100 steps (accuracy 0.18 -> 0.28). The three
arms also share their samples' randomness (same sampler key per step, nearly the same policy), which is why the
paired differences are much tighter than the spread over seeds.

What differs from the paper. The paper trains billion-parameter base models (R1-Zero style, no SFT) on math
questions with responses of hundreds to thousands of tokens; here a 0.82 M-parameter Llama, started from a 400-step
SFT model, on the toy task's short answers (2-8 tokens, a 32-token cap) for 100 steps. The paper measures the
lengths of its models' responses over training; here the training samples of each step. Only the loss aggregation
and the advantage scaling differ between the arms; everything else is configs/grpo.py's toy tuning.

Writes to --workdir: runs.csv (every aggregation x seed: lengths and accuracy over the first and last window,
seconds), curves.csv (every run x step: mean length of correct / incorrect / all benign completions, counts,
accuracy), results.md (table, mean ± sample std over seeds, the verdict), results.json (config, numbers, per-step
curves mean ± std, command, seconds) and results.png (length of correct and incorrect completions vs step, one
panel per aggregation, mean ± std over seeds, plus accuracy vs step). Finished runs (<workdir>/runs/<run>/
result.json) are skipped on rerun; an interrupted one resumes from its checkpoints; a rerun with other settings in
the same --workdir is refused.
"""

from __future__ import annotations

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
import toy_pipeline as tp  # noqa: E402  (its flags: --workdir, --seed (SFT), --sft_steps, --threads)

from align_jax.errors import UserError  # noqa: E402

flags.DEFINE_string("size", "", "'' (default size) or 'tiny' (seconds, for tests).")
flags.DEFINE_list("aggregations", None, "Override the aggregations (grpo, dr_grpo, dapo).")
flags.DEFINE_list("seeds", None, "Override the GRPO seeds (prompt order, sampling); the SFT stage's seed is --seed.")
flags.DEFINE_integer("steps", 0, "Override the GRPO steps (0 = the size's default).")
flags.DEFINE_integer("max_completion_length", 0, "Override the completion cap in tokens (0 = the size's default).")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "/tmp/align_jax_length_bias")

# aggregation -> (loss name, grpo.scale_rewards)
AGGREGATIONS = {
    "grpo": ("grpo:grpo", "group"),  # per-response mean over its tokens, std-normalised advantages (Shao et al.)
    "dr_grpo": ("grpo:dr_grpo", "none"),  # Σ tokens / (B·N), advantages not divided by the std (Liu et al. 2025)
    "dapo": ("grpo:dapo", "group"),  # token-level mean over the batch, std-normalised advantages (Yu et al. 2025)
}
REWARD_SPEC = "length_bias:length_logging_correctness"
CSV_FIELDS = ["aggregation", "seed", "len_correct_first", "len_correct_last", "len_incorrect_first",
              "len_incorrect_last", "d_len_correct", "d_len_incorrect", "gap_last", "len_all_first", "len_all_last",
              "accuracy_first", "accuracy_last", "clipped_last", "steps", "seconds", "run"]
CURVE_FIELDS = ["aggregation", "seed", "step", "len_correct", "len_incorrect", "len_all", "n_correct",
                "n_incorrect", "accuracy", "clipped"]


def get_config(arg: str = ""):
    """The experiment's config; `arg="tiny"`: 2 aggregations x 2 seeds of 3 steps (the test's size)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.aggregations = ("grpo", "dr_grpo", "dapo")
    c.seeds = (0, 1, 2)
    c.steps = 100  # configs/grpo.py's default length
    c.batch_size = 8  # prompts per step
    c.num_generations = 8  # G
    c.max_completion_length = 32  # configs/grpo.py: 12; toy answers are 2-8 tokens with EOS
    c.learning_rate = 3e-4  # configs/grpo.py's toy tuning
    c.temperature = 1.0
    c.window = 10  # steps averaged at the start and at the end of a run
    c.sft_steps = 0  # 0 = configs/sft.py's default (400), the toy pipeline's SFT stage
    if arg == "tiny":
        c.aggregations = ("grpo", "dr_grpo")
        c.seeds = (0, 1)
        c.steps = 3
        c.batch_size = 4
        c.num_generations = 2
        c.max_completion_length = 16
        c.window = 1
        c.sft_steps = 2
    elif arg:
        raise UserError(f"unknown size {arg!r}; use '' or 'tiny'")
    return c


# ------------------------------------------------------------------------------------------ the reward function


def correctness_and_lengths(prompts, completions, completion_ids) -> tuple[list[float], list[int], list]:
    """(rewards, lengths, correct) of a rollout: the toy task's correctness (1.0 / 0.0; 0.0 for secret requests),
    each completion's length in tokens (its `completion_ids`, EOS included) and its correctness as 1 / 0, None for
    the secret requests (correctness does not apply)."""
    from align_jax.data.toy import scoring

    correct = [scoring.axis_scores(p, c)["correctness"] for p, c in zip(prompts, completions)]
    return [float(x or 0) for x in correct], [len(ids) for ids in completion_ids], correct


def length_logging_correctness(prompts, completions, completion_ids=None, log_path=None, **kwargs):
    """Reward function (TRL's signature): the toy task's correctness, and, with `log_path`, one JSON line per call
    ({"lengths": [...], "correct": [1 | 0 | null, ...]}) appended to that file. The trainer calls it once per rollout
    (grpo.num_iterations 1: once per step), so line k is step k + 1."""
    if completion_ids is None:
        raise ValueError("length_logging_correctness needs completion_ids (passed by the GRPO trainer)")
    rewards, lengths, correct = correctness_and_lengths(prompts, completions, completion_ids)
    if log_path:
        with open(log_path, "a") as f:
            f.write(json.dumps({"lengths": lengths, "correct": correct}) + "\n")
    return rewards


def step_stats(record: dict) -> dict:
    """One rollout's log line -> mean length of its correct / incorrect / all benign completions (NaN when there is
    none), their counts, accuracy (fraction correct among the benign completions) and the mean length of all
    completions (secret requests included: the trainer's `completions/mean_length`)."""
    lengths = np.asarray(record["lengths"], np.float64)
    corr = record["correct"]
    ok = np.asarray([x == 1 for x in corr])
    bad = np.asarray([x == 0 for x in corr])
    benign = ok | bad

    def m(sel):
        return float(lengths[sel].mean()) if sel.any() else float("nan")

    return {"len_correct": m(ok), "len_incorrect": m(bad), "len_benign": m(benign), "len_all": float(lengths.mean()),
            "n_correct": int(ok.sum()), "n_incorrect": int(bad.sum()),
            "accuracy": float(ok.sum() / benign.sum()) if benign.any() else float("nan")}


def read_length_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_length_log(path: str, steps: int) -> None:
    """Keeps the first `steps` lines of a run's length log (those of the steps a resumed run restores)."""
    if not os.path.exists(path):
        return
    ab.write_jsonl_atomic(path, read_length_log(path)[:steps])


def last_checkpoint(run_dir: str) -> int:
    """The latest step saved in <run_dir>/checkpoints (0 when none): where an interrupted run resumes."""
    d = os.path.join(run_dir, "checkpoints")
    steps = [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []
    return max(steps, default=0)


def window_mean(values, n: int, last: bool) -> float:
    """Mean of the finite values among the first (or last) `n` entries (NaN when none)."""
    v = np.asarray(values, np.float64)
    v = v[-n:] if last else v[:n]
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


# ------------------------------------------------------------------------------------------------------- runs


def run_name(agg: str, seed: int) -> str:
    return f"{agg}_seed{seed}"


def run_config(agg: str, seed: int, wd: str, sft_path: str, log_path: str, c):
    """configs/grpo.py with this experiment's overrides: no new trainer code, only `train(config, run_dir)`."""
    import ml_collections

    loss, scale = AGGREGATIONS[agg]
    cfg = ab.load_config("grpo", wd, seed)
    cfg.model.init_from = sft_path
    cfg.loss.name = loss
    cfg.loss.kwargs = {"beta": 0.0, "epsilon": 0.2}
    cfg.loss.reference_free = True  # β = 0: no reference forward
    cfg.grpo.scale_rewards = scale
    cfg.grpo.num_generations = c.num_generations
    cfg.grpo.max_completion_length = c.max_completion_length
    cfg.grpo.temperature = c.temperature
    cfg.grpo.num_iterations = 1  # one rollout per step: line k of the length log is step k + 1
    cfg.grpo.log_completions_every = max(c.steps // 4, 1)
    cfg.rewards.functions = (REWARD_SPEC,)
    cfg.rewards.weights = (1.0,)
    cfg.rewards.kwargs = ml_collections.ConfigDict({REWARD_SPEC: {"log_path": log_path}})
    cfg.optimizer.learning_rate = c.learning_rate
    cfg.batch_size = c.batch_size
    cfg.total_steps = c.steps
    cfg.checkpoint.every_steps = max(c.steps // 2, 1) if c.steps >= 10 else c.steps  # tiny: only at the end
    cfg.eval_every = 0
    cfg.eval_generation = 0
    cfg.export = False  # the measurement is the training samples' lengths
    cfg.progress_bar = False
    cfg.log_every = max(c.steps // 4, 1)
    return cfg


def signature(agg: str, c) -> dict:
    """What a finished run's numbers depend on besides its name: a rerun with other settings must not reuse them."""
    loss, scale = AGGREGATIONS[agg]
    return {"loss": loss, "scale_rewards": scale, "steps": c.steps, "batch_size": c.batch_size,
            "num_generations": c.num_generations, "max_completion_length": c.max_completion_length,
            "learning_rate": c.learning_rate, "temperature": c.temperature, "sft_steps": c.sft_steps,
            "sft_seed": FLAGS.seed}


def one_run(agg: str, seed: int, wd: str, sft_path: str, c) -> dict:
    """Trains one aggregation x seed (or reads its result.json when it is done). Returns its result, with the
    per-step curve."""
    from align_jax.train import train

    name = run_name(agg, seed)
    rd = os.path.join(wd, "runs", name)
    log_path = os.path.join(rd, "lengths.jsonl")

    def compute():
        t0 = time.time()
        truncate_length_log(log_path, last_checkpoint(rd))  # an interrupted run: keep the restored steps' lines
        cfg = run_config(agg, seed, wd, sft_path, log_path, c)
        print(f"[{name}] training {cfg.loss.name} (scale_rewards={cfg.grpo.scale_rewards}), {c.steps} steps",
              flush=True)
        train(cfg, rd)
        records = read_length_log(log_path)
        rows, _ = tp.read_metrics(os.path.join(rd, "metrics.jsonl"))
        check_log(records, rows, c.steps, name)
        curve = [step_stats(r) for r in records]
        for s, row in zip(curve, rows):
            s["clipped"] = float(row["completions/clipped_ratio"])
        return {"run": name, "aggregation": agg, "seed": seed, "seconds": time.time() - t0, "curve": curve,
                **summarize(curve, c.window)}

    res = ab.cached_run(rd, signature(agg, c), compute, keep_export=False)
    print(f"[{name}] incorrect length {res['len_incorrect_first']:.2f} -> {res['len_incorrect_last']:.2f}, correct "
          f"{res['len_correct_first']:.2f} -> {res['len_correct_last']:.2f}, accuracy {res['accuracy_first']:.2f} -> "
          f"{res['accuracy_last']:.2f} ({res['seconds']:.0f}s)", flush=True)
    return res


def check_log(records: list[dict], rows: list[dict], steps: int, name: str) -> None:
    """The length log must hold one rollout per training step, equal to the trainer's own mean length."""
    if len(records) != steps or len(rows) != steps:
        raise RuntimeError(f"{name}: {len(records)} logged rollouts and {len(rows)} metric rows for {steps} steps")
    for k, (rec, row) in enumerate(zip(records, rows)):
        if abs(np.mean(rec["lengths"]) - float(row["completions/mean_length"])) > 1e-4:
            raise RuntimeError(f"{name}: step {k + 1}: logged mean length {np.mean(rec['lengths'])} != the trainer's "
                               f"{row['completions/mean_length']}")


def summarize(curve: list[dict], window: int) -> dict:
    """A run's numbers: mean of each per-step quantity over the first and the last `window` steps, and changes."""
    out = {}
    for key, short in (("len_correct", "len_correct"), ("len_incorrect", "len_incorrect"), ("len_all", "len_all"),
                       ("accuracy", "accuracy")):
        vals = [s[key] for s in curve]
        out[f"{short}_first"] = window_mean(vals, window, last=False)
        out[f"{short}_last"] = window_mean(vals, window, last=True)
    out["d_len_correct"] = out["len_correct_last"] - out["len_correct_first"]
    out["d_len_incorrect"] = out["len_incorrect_last"] - out["len_incorrect_first"]
    out["gap_last"] = out["len_incorrect_last"] - out["len_correct_last"]
    out["clipped_last"] = window_mean([s.get("clipped", float("nan")) for s in curve], window, last=True)
    out["steps"] = len(curve)
    return out


# ------------------------------------------------------------------------------------------------ summaries


TABLE_KEYS = [("len_correct_first", "correct, first"), ("len_correct_last", "correct, last"),
              ("len_incorrect_first", "incorrect, first"), ("len_incorrect_last", "incorrect, last"),
              ("d_len_incorrect", "Δ incorrect"), ("d_len_correct", "Δ correct"),
              ("gap_last", "incorrect − correct, last"), ("accuracy_first", "accuracy, first"),
              ("accuracy_last", "accuracy, last"), ("clipped_last", "truncated, last")]


def aggregate(rows: list[dict]) -> dict:
    """{(aggregation,): {key: (mean, sample std, n), "seeds": {seed: row}}} over seeds."""
    return ab.aggregate(rows, ("aggregation",), tuple(k for k, _ in TABLE_KEYS))


def paired(rows: list[dict], a: str, b: str, key: str) -> tuple[float, float, int] | None:
    """(mean, sample std, n) over the seeds both have of row[a][key] − row[b][key] (same seed: same SFT model,
    same first rollout); None when they share no seed."""
    by = {(r["aggregation"], int(r["seed"])): float(r[key]) for r in rows}
    seeds = sorted({s for (g, s) in by if g == a} & {s for (g, s) in by if g == b})
    if not seeds:
        return None
    d = [by[(a, s)] - by[(b, s)] for s in seeds]
    return ab.mean_std(d)


def verdict(rows: list[dict], window: int) -> str:
    """The answer to the paper's claim from the numbers, in three parts (changes = last `window` steps − first, per
    run; "paired" = grpo − dr_grpo over the seeds both have: same SFT model, same prompts, same first rollout):
      1. incorrect completions grow more under grpo than under dr_grpo: the paired difference of their change is
         > 0 by more than one std and in every seed;
      2. under dr_grpo incorrect completions do not grow: dr_grpo's change is within one std of 0 (or below);
      3. grpo lengthens incorrect completions relative to correct ones: the paired difference of (change of the
         incorrect length − change of the correct length) is > 0 by more than one std.
    Supported when all three hold, partly supported when 1 holds, reversed when 1 is clearly the other way."""
    aggs = {r["aggregation"] for r in rows}
    if not {"grpo", "dr_grpo"} <= aggs:
        return "Not answered: the run lacks grpo or dr_grpo."
    rows = [dict(r, d_gap=float(r["d_len_incorrect"]) - float(r["d_len_correct"])) for r in rows]
    agg = aggregate(rows)
    g, d = agg[("grpo",)]["d_len_incorrect"], agg[("dr_grpo",)]["d_len_incorrect"]
    diff = paired(rows, "grpo", "dr_grpo", "d_len_incorrect")
    gap = paired(rows, "grpo", "dr_grpo", "d_gap")
    by = {(r["aggregation"], int(r["seed"])): float(r["d_len_incorrect"]) for r in rows}
    seeds = sorted({s for (a, s) in by if a == "grpo"} & {s for (a, s) in by if a == "dr_grpo"})
    n_more = sum(by[("grpo", s)] > by[("dr_grpo", s)] for s in seeds)
    head = (f"Change of the incorrect completions' mean length over training (last {window} steps − first {window}): "
            f"grpo {ab.fmt(g, 2)} tokens, dr_grpo {ab.fmt(d, 2)}")
    if "dapo" in aggs:
        head += f", dapo {ab.fmt(agg[('dapo',)]['d_len_incorrect'], 2)}"
    head += (f"; grpo − dr_grpo paired by seed {ab.fmt(diff, 2)} (larger under grpo in {n_more} of {len(seeds)} "
             f"seeds). Change of the correct completions' length: grpo {ab.fmt(agg[('grpo',)]['d_len_correct'], 2)}, "
             f"dr_grpo {ab.fmt(agg[('dr_grpo',)]['d_len_correct'], 2)}; change of (incorrect − correct), grpo − "
             f"dr_grpo paired: {ab.fmt(gap, 2)}.")
    if diff[2] < 2:
        return "**Inconclusive: a single seed.** " + head
    grows_more = diff[0] - diff[1] > 0 and n_more == len(seeds) and g[0] > 0
    dr_flat = d[0] - d[1] <= 0
    rel = gap[0] - gap[1] > 0
    parts = (f"(1) incorrect completions grow more under grpo than under dr_grpo: {'yes' if grows_more else 'no'}; "
             f"(2) they do not grow under dr_grpo: {'yes' if dr_flat else 'no, they grow'}; (3) grpo lengthens "
             f"incorrect completions relative to correct ones: {'yes' if rel else 'no'}. ")
    if grows_more and dr_flat and rel:
        return "**Supported at this size:** " + parts + head
    if grows_more:
        return "**Partly supported at this size:** " + parts + head
    if diff[0] + diff[1] < 0 and n_more == 0:
        return ("**Not supported (reversed) at this size:** incorrect completions grow less under grpo than under "
                "dr_grpo. " + parts + head)
    return "**Not supported at this size:** " + parts + head


def markdown(agg: dict, rows: list[dict], c, seconds: float) -> str:
    aggs = [a for a in c.aggregations if (a,) in agg]
    lines = [f"# Dr. GRPO length bias on the toy task: {c.steps} GRPO steps of {c.batch_size} prompts x "
             f"{c.num_generations} samples, completion cap {c.max_completion_length} tokens, reward = correctness",
             "",
             f"Mean length (tokens, EOS included) of the correct and the incorrect sampled completions of the benign "
             f"prompts over the first and the last {c.window} steps; Δ = last − first; accuracy = fraction of them "
             f"correct; truncated = fraction of all completions that hit the cap. Mean ± sample std over seeds "
             f"{', '.join(str(s) for s in c.seeds)}.",
             "",
             "| aggregation | " + " | ".join(label for _, label in TABLE_KEYS) + " |",
             "|---|" + "---|" * len(TABLE_KEYS)]
    for a in aggs:
        lines.append(f"| {a} | " + " | ".join(ab.fmt(agg[(a,)][k], 2) for k, _ in TABLE_KEYS) + " |")
    lines += ["", verdict(rows, c.window), "",
              f"({seconds:.0f} s this invocation; the runs' own training time "
              f"{sum(float(r['seconds']) for r in rows):.0f} s (measured when each was trained); command: "
              f"`{ab.command_line()}`)"]
    return "\n".join(lines)


def curves_by_aggregation(results: list[dict], key: str) -> dict:
    """{aggregation: (steps [S], mean over seeds [S], std over seeds [S] (ddof 1, NaN-aware), seeds)}: the per-step
    quantity `key` across the seeds of each aggregation."""
    out = {}
    for a in dict.fromkeys(r["aggregation"] for r in results):
        mat = np.asarray([[s[key] for s in r["curve"]] for r in results if r["aggregation"] == a], np.float64)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(mat, axis=0)
                n = np.sum(np.isfinite(mat), axis=0)
                std = np.where(n > 1, np.nanstd(mat, axis=0, ddof=1) if mat.shape[0] > 1 else 0.0, 0.0)
        out[a] = (np.arange(1, mat.shape[1] + 1), mean, std, mat.shape[0])
    return out


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over `k` steps ignoring NaNs (NaN where the window holds none)."""
    x = np.asarray(x, np.float64)
    out = np.full_like(x, np.nan)
    for i in range(len(x)):
        w = x[max(0, i - k + 1): i + 1]
        w = w[np.isfinite(w)]
        if len(w):
            out[i] = w.mean()
    return out


def plot(results: list[dict], c, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggs = [a for a in c.aggregations if any(r["aggregation"] == a for r in results)]
    k = max(1, c.window // 2)
    smoothed = [dict(r, curve=[dict(s, **{key: v for key, v in zip(
        ("len_correct", "len_incorrect", "accuracy"), vals)}) for s, vals in zip(
        r["curve"], zip(*(smooth([s[key] for s in r["curve"]], k) for key in ("len_correct", "len_incorrect",
                                                                               "accuracy"))))]) for r in results]
    fig, axes = plt.subplots(1, len(aggs) + 1, figsize=(4.2 * (len(aggs) + 1), 3.8), squeeze=False)
    axes = axes[0]
    ymax = 0.0
    for ax, a in zip(axes, aggs):
        for key, label, color in (("len_correct", "correct", "tab:green"), ("len_incorrect", "incorrect", "tab:red")):
            steps, mean, std, n = curves_by_aggregation([r for r in smoothed if r["aggregation"] == a], key)[a]
            ax.plot(steps, mean, color=color, label=f"{label} completions")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
            every = max(1, len(steps) // 10)
            ax.errorbar(steps[::every], mean[::every], yerr=std[::every], fmt="none", ecolor=color, capsize=2, lw=0.8)
            ymax = max(ymax, float(np.nanmax(mean + std)) if np.isfinite(mean + std).any() else 0.0)
        loss, scale = AGGREGATIONS[a]
        ax.set_title(f"{a} ({loss}, scale_rewards={scale})", fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean completion length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[:len(aggs)]:
        ax.set_ylim(0, max(ymax * 1.1, 1.0))
    ax = axes[-1]
    for a, color in zip(aggs, ("tab:blue", "tab:orange", "tab:purple", "tab:gray")):
        steps, mean, std, n = curves_by_aggregation([r for r in smoothed if r["aggregation"] == a], "accuracy")[a]
        ax.plot(steps, mean, color=color, label=a)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("fraction of benign completions correct")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("accuracy of the samples", fontsize=9)
    fig.suptitle(f"Dr. GRPO length bias on the toy task (reward = correctness, cap {c.max_completion_length} tokens): "
                 f"{k}-step moving average; bands and error bars = ± std over {len(c.seeds)} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def config_from_flags():
    c = get_config(FLAGS.size)
    if FLAGS.aggregations:
        unknown = [a for a in FLAGS.aggregations if a not in AGGREGATIONS]
        if unknown:
            raise UserError(f"--aggregations: unknown {unknown}; choose from {list(AGGREGATIONS)}")
        c.aggregations = tuple(FLAGS.aggregations)
    if FLAGS.seeds:
        try:
            c.seeds = tuple(int(s) for s in FLAGS.seeds)
        except ValueError:
            raise UserError(f"--seeds: integers, got {FLAGS.seeds}") from None
    if FLAGS.steps < 0 or FLAGS.max_completion_length < 0:
        raise UserError("--steps and --max_completion_length must be >= 0")
    c.steps = FLAGS.steps or c.steps
    c.max_completion_length = FLAGS.max_completion_length or c.max_completion_length
    if FLAGS.sft_steps:
        c.sft_steps = FLAGS.sft_steps
    c.window = min(c.window, c.steps)
    return c


def register() -> None:
    """Makes REWARD_SPEC importable by the trainer ("length_bias:length_logging_correctness"), also when this file
    runs as __main__ (the trainer imports the module by name)."""
    sys.modules.setdefault("length_bias", sys.modules[__name__])


def nan_to_none(x):
    """A copy of a JSON-like object with NaN / ±inf floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def run(c, wd: str) -> dict:
    t0 = time.time()
    os.makedirs(wd, exist_ok=True)
    register()
    sft_path = tp.sft_stage(wd, c.sft_steps)
    results = []
    for seed in c.seeds:  # seed-major: an interrupted default run already has every aggregation for the first seeds
        for a in c.aggregations:
            results.append(one_run(a, seed, wd, sft_path, c))
            ab.write_csv(os.path.join(wd, "runs.csv"), results, CSV_FIELDS)
    curve_rows = [{"aggregation": r["aggregation"], "seed": r["seed"], "step": i + 1, **s}
                  for r in results for i, s in enumerate(r["curve"])]
    ab.write_csv(os.path.join(wd, "curves.csv"), curve_rows, CURVE_FIELDS)
    rows = [{k: r[k] for k in CSV_FIELDS} for r in results]
    agg = aggregate(rows)
    seconds = time.time() - t0
    md = markdown(agg, rows, c, seconds)
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write(md + "\n")
    curves = {key: {a: {"mean": v[1].tolist(), "std": v[2].tolist(), "seeds": v[3]}
                    for a, v in curves_by_aggregation(results, key).items()}
              for key in ("len_correct", "len_incorrect", "accuracy")}
    out = {"config": c.to_dict(), "seconds": seconds, "run_seconds": {r["run"]: r["seconds"] for r in results},
           "command": ab.command_line(),
           "cells": [{"aggregation": a, **{k: list(agg[(a,)][k]) for k, _ in TABLE_KEYS}}
                     for a in c.aggregations if (a,) in agg],
           "verdict": verdict(rows, c.window), "curves": curves}
    ab.write_json_atomic(os.path.join(wd, "results.json"), nan_to_none(out))
    plot(results, c, os.path.join(wd, "results.png"))
    print(md + f"\n\n(total {seconds:.0f}s; {wd}/results.md, results.png, runs.csv, curves.csv)")
    return out


def main(argv):
    del argv
    from align_jax import cli

    cli.pin_threads(FLAGS.threads)
    cli.console(cli.verbose_from_env())
    ab.use_compile_cache(FLAGS.workdir)
    cli.run(lambda: run(config_from_flags(), FLAGS.workdir), cli.verbose_from_env())


if __name__ == "__main__":
    from absl import app

    app.run(main)
