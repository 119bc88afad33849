"""Preference-label noise on the toy task: DPO, cDPO, robust DPO, IPO, ORPO and soft labels vs the flip rate ε.

    python experiments/label_noise.py --workdir=/tmp/align_jax_label_noise      # default size, 12.6 min (measured)
    python experiments/label_noise.py --workdir=/tmp/label_noise_tiny --size=tiny   # ~40-60 s (the test's size)
    python experiments/label_noise.py --workdir=... --grid=full      # 6 methods x 5 ε x 3 seeds (24 min, 2 cores)
    python experiments/label_noise.py --workdir=... --methods=DPO,ORPO,IPO,soft --eps=0,0.2,0.4 --steps=40

Papers. cDPO: Mitchell, "A note on DPO with noisy preferences & relationship to IPO" (2023): if a fraction ε
of labels is flipped, train on the expected loss under the label posterior, −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)
(`dpo:sigmoid` with `label_smoothing=ε`). Robust DPO (rDPO): Chowdhury, Kini, Natarajan, "Provably Robust DPO:
Aligning Language Models with Noisy Feedback" (ICML 2024), eq. 6: [−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε), an
unbiased estimate of the clean DPO loss under random flips of known rate ε (`dpo:robust`, TRL's
loss_type="robust" with label_smoothing=ε). IPO: Azar et al. 2023 (`dpo:ipo`), which regresses margins on a
finite target instead of pushing them to infinity. ORPO: Hong, Lee, Thorne 2024 (`orpo`): NLL on the chosen
response + β·odds-ratio term, no reference model. Soft labels: the toy pairs' own `chosen_prob`
(Bradley-Terry on the gold-reward gap, 0.58-0.91; `pairs_soft.jsonl`), used by the project's DPO as the expected
loss over the label, p·ℓ(Δ) + (1−p)·ℓ(−Δ) (`loss.use_soft_labels`, the default).

Claim examined. The claim handed to this experiment (issue 14, item 3) is that ORPO is robust to label noise (the
argument usually given: its NLL term on the chosen response anchors the policy, and there is no reference ratio to
push to infinity). The script states in results.md, from the measured numbers, whether ORPO's loss of gold reward
and of preference accuracy between ε = 0 and the largest ε is smaller than DPO's, larger, or not distinguishable
at this size (mean ± sample std over seeds; "inconclusive" when the ± 1 std intervals of the two drops overlap).
The claim's wording in the ORPO paper itself was not available to check here.

Setting. The toy task of experiments/toy_pipeline.py (README "What the default pipeline shows"): one shared SFT
stage (`toy_pipeline.sft_stage`, config seed --seed, default 0: 400 steps from random init), then for every
method x ε x seed a preference stage started from the SFT export (the reference of the DPO family = the SFT
model) with the project's `train(config, workdir)` on configs/dpo.py or configs/orpo.py with overrides. Every
method gets the same budget: `steps` optimizer steps of 16 pairs, AdamW lr 1e-4 with linear decay, β = 0.1 (IPO's
τ = β, TRL's convention; ORPO's λ = β, TRL's convention). Noise: a fraction ε of the 2000 training pairs has its
chosen and rejected swapped: exactly round(ε·n) pairs, the first round(ε·n) of a permutation drawn from the run's
seed (so for one seed the flipped set at ε = 0.2 is contained in the set at 0.4, and each seed flips different
pairs); the noisy file is written to <workdir>/noisy/. For soft labels the same pairs get p → 1 − p (texts kept;
for the DPO loss this equals swapping the texts and keeping p). cDPO and rDPO are given the true ε, as their
papers assume; the other methods get no knowledge of ε. At ε = 0 cDPO and rDPO are DPO's loss exactly, so those
cells reuse DPO's run (runs.csv: column `run`). The seed sets the preference stage's data order and the flipped
pairs; the SFT model and the toy task are the same for every run, so the ± std shows the variation of the
preference stage only (smaller than the README's seed-to-seed spread, which re-runs SFT too).

Evaluation, on clean held-out data (`toy_pipeline.evaluate_policy`): gold reward of greedy answers to the toy task's
held-out prompts (operand pairs never seen in training; max 1.5), and preference accuracy on the 300 clean held-out
pairs. For the DPO family (DPO, cDPO, rDPO, IPO, soft) the accuracy is the implicit-reward accuracy,
log π(y_w)/π_ref(y_w) > log π(y_l)/π_ref(y_l) with π_ref the SFT model (what these losses train);
for ORPO, which has no reference model, it is the policy log-likelihood accuracy log π(y_w) > log π(y_l) (sums
over the completion tokens). runs.csv has both accuracies for every method (`implicit_accuracy`,
`loglik_accuracy`) and the other axes of the toy task.

Default size: methods DPO, cDPO, rDPO, ORPO; ε ∈ {0, 0.4}; seeds 0, 1, 2; 120 steps of 16 pairs (configs/dpo.py's
own); 300 held-out prompts. 18 runs (cDPO and rDPO at ε = 0 are DPO's) of 27-68 s each after the SFT stage (85 s):
12 min 38 s in all on one core (measured on the project's 2-core CPU machine before `--jobs`; the cells now run
in one process per CPU). IPO, soft labels and ε = 0.1-0.3 are left to `--methods` / `--eps` / `--grid=full` (all 6
methods x ε ∈ {0, 0.1, 0.2, 0.3, 0.4} x seeds 0-2, 84 runs: 23 min 44 s end to end on both cores, 2026-11-30; the
table in the README). `--size=tiny`: DPO and ORPO x ε {0, 0.4} x 2 seeds, 2 steps of 8 pairs,
SFT 2 steps, the first 200 training pairs, 8 held-out prompts, 32 held-out pairs (numbers meaningless; the test's
size). Check of the setting: the DPO run at ε = 0, seed 0 reproduces experiments/toy_pipeline.py's seed-0 DPO
(gold reward 1.003, log-likelihood accuracy 0.930) to the last digit.

Measured at the default size (results.md; mean ± std over seeds 0-2):

    gold reward        ε = 0            ε = 0.4          preference accuracy   ε = 0            ε = 0.4
    DPO                0.984 ± 0.016    0.959 ± 0.048    (implicit reward)     0.886 ± 0.010    0.764 ± 0.042
    cDPO               (DPO's run)      0.751 ± 0.022    (implicit reward)     (DPO's run)      0.794 ± 0.047
    rDPO               (DPO's run)      0.918 ± 0.040    (implicit reward)     (DPO's run)      0.757 ± 0.062
    ORPO               1.047 ± 0.002    0.876 ± 0.073    (log-likelihood)      0.913 ± 0.000    0.766 ± 0.011
    SFT start          0.388                             (log-likelihood)      0.563

ORPO's claimed robustness is not supported at this size: it starts higher but loses more gold reward from ε = 0 to
0.4 than DPO (0.171 ± 0.073 vs 0.026 ± 0.064; larger in 3 of 3 seeds); its accuracy drop is not distinguishable
from DPO's (0.148 ± 0.011 vs 0.121 ± 0.033, different quantities; with the same quantity for both, log-likelihood
accuracy 0.148 ± 0.011 vs 0.141 ± 0.093). rDPO is not distinguishable from DPO; cDPO has the best accuracy at
ε = 0.4 but the lowest gold reward, and its training loss barely leaves log 2 (0.6928): consistent with its
bounded optimum (βΔ* = log((1−ε)/ε) = 0.41 at ε = 0.4) keeping the policy nearer the SFT start (over-refusal
0.11-0.14 vs DPO's 0.00-0.05, SFT 0.24).

Training length. The answer depends on it. With --steps=40 (all 6 methods, ε ∈ {0, 0.2, 0.4}, seeds 0-2, 14 min)
the gold reward at ε = 0.4 was ORPO 0.804 ± 0.024, soft 0.679 ± 0.129, rDPO 0.666 ± 0.227, DPO 0.649 ± 0.200, IPO
0.604 ± 0.137, cDPO 0.564 ± 0.114, and ORPO's gold drop from ε = 0 the smallest (0.226 ± 0.015 vs DPO's 0.371 ±
0.203: "inconclusive" by the ± 1 std rule, but smaller in 3 of 3 seeds, and in 6 of 6 with seeds 0-5 for DPO and
ORPO: 0.229 ± 0.061 vs 0.359 ± 0.149). Under 40 % flips the net preference signal of the pairs is 1 − 2ε = 0.2 of
the clean one and DPO's training margins stay near 0 (βΔ ≈ 0.007 over the last steps, vs 0.40 at ε = 0): after 40
steps some seeds are still close to the SFT start, after 120 they have caught up. ORPO's NLL term on the chosen
responses (60 % of them still the better one) moves the policy whatever the labels. So at 40 steps ORPO looks
robust because DPO is slow under noise, not because ORPO's preference term resists it. At both lengths the DPO
family's mean training margin stays small (βΔ ≈ 0.4 at ε = 0 after 120 steps, ≈ 0.01 at ε = 0.4), far from the
converged regime that the cDPO and rDPO analyses are about.

What differs from the papers. Noise is synthetic and uniform (random flips of a known rate); the model is a
0.82 M-parameter Llama on a synthetic task trained for at most 120 steps (0.96 epochs), not to convergence.
ORPO starts from the SFT model (its paper trains from the base model with no SFT stage) and uses the toy DPO
learning rate 1e-4, not TRL's ORPO default 8e-6 (meant for billion-parameter models; measured here: 120 steps at
8e-6 reach gold reward 0.638 at ε = 0, seed 0, vs 1.045 at 1e-4), and ORPO's NLL term trains on the (possibly
flipped) chosen response, as it would on noisy data. Preference accuracies of ORPO (log-likelihood) and of the
DPO family (implicit reward) are different quantities; gold reward is comparable across all methods. rDPO and
cDPO get the true ε; in practice ε has to be estimated.

Writes to --workdir: runs.csv (every method x ε x seed: gold reward, preference accuracy, both accuracies, the
toy task's axes, final loss = mean of the last 10 training losses, seconds), results.md (mean ± sample std over
seeds per method x ε, the SFT start, and the answer to the ORPO question), results.json (the same, the config)
and results.png (gold reward and preference accuracy vs ε, a line per method, error bars = std over seeds).
Each finished run (<workdir>/runs/<run>/result.json; its checkpoints are then deleted, its export kept) is
skipped on rerun; an interrupted one resumes from its checkpoints. A rerun with other settings in the same
--workdir is refused.
"""

from __future__ import annotations

import json
import os
import shutil
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
flags.DEFINE_string("grid", "", "'' (the size's ε subset) or 'full' (all methods, ε 0,0.1,0.2,0.3,0.4, seeds 0,1,2).")
flags.DEFINE_list("methods", None, "Override the methods (DPO, cDPO, rDPO, IPO, ORPO, soft).")
flags.DEFINE_list("eps", None, "Override the flip rates ε (each in [0, 0.5)).")
flags.DEFINE_list("seeds", None, "Override the preference-stage seeds (data order and flipped pairs); the SFT "
                  "stage's seed is --seed.")
flags.DEFINE_integer("steps", 0, "Override the preference-stage steps (0 = the size's default).")
flags.DEFINE_integer("jobs", 0, "Run the grid's cells in this many processes, one CPU each (the same numbers as "
                     "1 job); 0 = one per CPU this process may use (2 on a 2-core machine about halves the time).")
flags.DEFINE_string("shard", "", "Internal (--jobs): compute only cells i, i+n, ... of the grid ('i/n').")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "/tmp/align_jax_label_noise")

# method -> (config file, loss name, training file of the toy task, knows ε)
METHODS = {
    "DPO": ("dpo", "dpo:sigmoid", "pairs", False),
    "cDPO": ("dpo", "dpo:sigmoid", "pairs", True),  # label_smoothing = ε (Mitchell 2023)
    "rDPO": ("dpo", "dpo:robust", "pairs", True),  # label_smoothing = ε (Chowdhury et al. 2024)
    "IPO": ("dpo", "dpo:ipo", "pairs", False),
    "ORPO": ("orpo", "orpo", "pairs", False),
    "soft": ("dpo", "dpo:sigmoid", "pairs_soft", False),  # chosen_prob as label_probs
}
FULL_EPS = (0.0, 0.1, 0.2, 0.3, 0.4)
FLIP_SALT = 143  # issue 14, item 3: the flip permutation's own stream, apart from any other use of the seed
CSV_FIELDS = ["method", "eps", "seed", "gold_reward", "preference_accuracy", "accuracy_kind", "implicit_accuracy",
              "loglik_accuracy", "correctness", "instruction_following", "safety", "over_refusal", "final_loss",
              "seconds", "flipped", "run"]
METRICS = [("gold_reward", "gold reward (held-out prompts, greedy; max 1.5)"),
           ("preference_accuracy", "preference accuracy (clean held-out pairs)")]


def get_config(arg: str = ""):
    """The experiment's config; `arg="tiny"`: 2 methods x 2 ε x 2 seeds of a few steps (the test's size)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    # The default subset fits ~15 min on one CPU core (measured 12.6 min: 18 runs of 27-68 s after an SFT stage of
    # 85 s); `--grid=full`: all of METHODS x FULL_EPS x 3 seeds (84 runs, 24 min on 2 cores)
    c.methods = ("DPO", "cDPO", "rDPO", "ORPO")
    c.eps = (0.0, 0.4)
    c.seeds = (0, 1, 2)
    c.steps = 120  # configs/dpo.py's default; fewer steps change the answer (docstring: "Training length")
    c.batch_size = 16
    c.learning_rate = 1e-4
    c.beta = 0.1
    c.sft_steps = 0  # 0 = configs/sft.py's default (400), the toy pipeline's SFT stage
    c.train_pairs = 0  # 0 = all of the toy task's 2000 training pairs; n = the first n
    c.eval_prompts = 300
    c.eval_pairs = 0  # 0 = all 300 clean held-out pairs; n = the first n
    if arg == "tiny":
        c.methods = ("DPO", "ORPO")
        c.eps = (0.0, 0.4)
        c.seeds = (0, 1)
        c.steps = 2
        c.batch_size = 8
        c.sft_steps = 2
        c.train_pairs = 200
        c.eval_prompts = 8
        c.eval_pairs = 32
    elif arg:
        raise UserError(f"unknown size {arg!r}; use '' or 'tiny'")
    return c


# ---------------------------------------------------------------------------------------------- noisy pairs


def flip_indices(n: int, eps: float, seed: int) -> np.ndarray:
    """The pairs to flip, sorted: exactly round(eps·n) of the n, the first ones of a permutation drawn from `seed`
    (deterministic in (seed, eps); for one seed a smaller eps flips a subset of a larger one's pairs)."""
    if not 0.0 <= eps < 0.5:
        raise UserError(f"flip rate {eps} must be in [0, 0.5) (at 0.5 the labels carry no information)")
    perm = np.random.default_rng([FLIP_SALT, seed]).permutation(n)
    return np.sort(perm[:round(eps * n)])


def flip_records(pairs: list[dict], soft: list[dict], idx) -> tuple[list[dict], list[dict]]:
    """Copies of the hard pairs with chosen/rejected swapped at `idx`, and of the soft pairs (same pairs, same
    order) with chosen_prob p -> 1 - p there (texts kept: for the DPO loss the same as swapping them, keeping p)."""
    if len(pairs) != len(soft):
        raise ValueError(f"pairs ({len(pairs)}) and pairs_soft ({len(soft)}) differ in length")
    hard_out, soft_out = [dict(r) for r in pairs], [dict(r) for r in soft]
    for i in idx:
        h, s = hard_out[i], soft_out[i]
        if (h["prompt"], h["chosen"], h["rejected"]) != (s["prompt"], s["chosen"], s["rejected"]):
            raise ValueError(f"pair {i} differs between pairs and pairs_soft")
        h["chosen"], h["rejected"] = h["rejected"], h["chosen"]
        s["chosen_prob"] = 1.0 - float(s["chosen_prob"])
    return hard_out, soft_out


def noisy_files(wd: str, eps: float, seed: int, n: int = 0) -> dict[str, str]:
    """Writes (once) <wd>/noisy/{pairs,pairs_soft}_eps<ε>_seed<s>.jsonl from the toy task's training pairs (the
    first `n`, 0 = all). Returns {"pairs": path, "pairs_soft": path, "flipped": number of flipped pairs}."""
    from align_jax.data.toy import read_jsonl

    out = os.path.join(wd, "noisy")
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"{name}_eps{eps:g}_seed{seed}.jsonl") for name in ("pairs", "pairs_soft")}
    toy = os.path.join(wd, "toy_data")
    pairs, soft = read_jsonl(os.path.join(toy, "pairs.jsonl")), read_jsonl(os.path.join(toy, "pairs_soft.jsonl"))
    if n:
        pairs, soft = pairs[:n], soft[:n]
    idx = flip_indices(len(pairs), eps, seed)
    if not all(os.path.exists(p) for p in paths.values()):
        hard, soft = flip_records(pairs, soft, idx)
        ab.write_jsonl_atomic(paths["pairs_soft"], soft)
        ab.write_jsonl_atomic(paths["pairs"], hard)
    return {**paths, "flipped": len(idx)}


# ----------------------------------------------------------------------------------------------------- runs


def run_name(method: str, eps: float, seed: int) -> str:
    """The run directory of a cell; cDPO and rDPO at ε = 0 are DPO's loss exactly and share DPO's run."""
    if method in ("cDPO", "rDPO") and eps == 0.0:
        method = "DPO"
    return f"{method}_eps{eps:g}_seed{seed}"


def run_config(method: str, eps: float, seed: int, train_file: str, wd: str, sft_path: str, c):
    """configs/<dpo|orpo>.py with this experiment's overrides: no new trainer code, only `train(config, wd)`."""
    from align_jax.cli import load_config_file

    cfg_name, loss, _, knows_eps = METHODS[method]
    cfg = load_config_file(os.path.join(HERE, "..", "configs", f"{cfg_name}.py"))
    cfg.seed = seed
    cfg.model.init_from = sft_path
    cfg.data.train = train_file
    cfg.data.eval = ""  # evaluated after training, on the clean held-out pairs (below)
    cfg.data.toy_dir, cfg.data.data_dir = os.path.join(wd, "toy_data"), os.path.join(wd, "tfds")
    cfg.data.max_length = 64  # configs/dpo.py's: toy examples are ~20-45 tokens
    cfg.data.length_buckets = (32, 48, 64)
    cfg.loss.name = loss
    kwargs = {"beta": c.beta}
    if cfg_name == "dpo":
        kwargs["label_smoothing"] = eps if knows_eps else 0.0
    cfg.loss.kwargs = kwargs
    cfg.optimizer.learning_rate = c.learning_rate
    cfg.optimizer.schedule = "linear"
    cfg.batch_size = c.batch_size
    cfg.total_steps = c.steps
    cfg.eval_every = 0
    cfg.eval_generation = 0
    cfg.progress_bar = False
    cfg.log_every = max(c.steps // 4, 1)
    return cfg


_REF = {}


def implicit_accuracy(path: str, sft_path: str, toy_dir: str, data_dir: str) -> float:
    """DPO implicit-reward accuracy on the clean held-out pairs with the SFT model as reference
    (`align_jax.evaluation.preference_accuracy`, the loader of `toy_pipeline.evaluate_policy`)."""
    from align_jax.data import build_dataset, make_loader
    from align_jax.evaluation import preference_accuracy
    from align_jax.models import load_pretrained
    from transformers import AutoTokenizer

    if sft_path not in _REF:
        _REF[sft_path] = load_pretrained(sft_path)
    tok = AutoTokenizer.from_pretrained(path)
    builder, _ = build_dataset(os.path.join(toy_dir, "eval_pairs.jsonl"), kind="pairwise", data_dir=data_dir)
    loader, _ = make_loader(builder.as_data_source("train"), tok, kind="pairwise", batch_size=100, shuffle=False,
                            num_epochs=1, drop_remainder=False, max_length=128, length_buckets=(64, 128))
    return preference_accuracy(load_pretrained(path), loader, ref_model=_REF[sft_path])["implicit_reward_accuracy"]


def eval_dir(wd: str, c) -> str:
    """The toy directory `toy_pipeline.evaluate_policy` reads (eval_prompts.jsonl, eval_pairs.jsonl): <wd>/toy_data,
    or with `c.eval_pairs` a copy holding the first eval_pairs held-out pairs (the tiny size)."""
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


def _signature(cfg, c) -> dict:
    """What a finished run's numbers depend on besides its name: a rerun with other settings must not reuse them."""
    return {"loss": cfg.loss.name, "loss_kwargs": dict(cfg.loss.kwargs), "steps": c.steps, "batch_size": c.batch_size,
            "learning_rate": c.learning_rate, "train_pairs": c.train_pairs, "sft_steps": c.sft_steps,
            "sft_seed": FLAGS.seed, "eval_prompts": c.eval_prompts, "eval_pairs": c.eval_pairs}


def one_run(method: str, eps: float, seed: int, wd: str, sft_path: str, c) -> dict:
    """Trains and evaluates one cell (or reads its result.json when it is done). Returns its result."""
    from align_jax.train import train

    name = run_name(method, eps, seed)
    canon = name.split("_eps")[0]
    rd = os.path.join(wd, "runs", name)
    files = noisy_files(wd, eps, seed, c.train_pairs)
    cfg = run_config(canon, eps, seed, files[METHODS[canon][2]], wd, sft_path, c)
    done = os.path.join(rd, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            res = json.load(f)
        if res.get("signature") != _signature(cfg, c):
            raise UserError(f"{rd} holds a finished run with other settings ({res.get('signature')}, now "
                            f"{_signature(cfg, c)}): use another --workdir")
        return res
    t0 = time.time()
    export = os.path.join(rd, "export")
    if not os.path.exists(os.path.join(export, "model.safetensors")):
        print(f"[{name}] training {cfg.loss.name} {dict(cfg.loss.kwargs)} on {cfg.data.train}", flush=True)
        train(cfg, rd)
    edir, data_dir = eval_dir(wd, c), os.path.join(wd, "tfds")
    scores = tp.evaluate_policy(export, edir, c.eval_prompts, data_dir)
    implicit = implicit_accuracy(export, sft_path, edir, data_dir)
    rows, _ = tp.read_metrics(os.path.join(rd, "metrics.jsonl"))
    losses = [float(r["loss"]) for r in rows][-10:]
    kind = "loglik" if canon == "ORPO" else "implicit"
    res = {"run": name, "method": canon, "eps": eps, "seed": seed, "gold_reward": scores["gold_reward"],
           "preference_accuracy": scores["preference_accuracy"] if kind == "loglik" else implicit,
           "accuracy_kind": kind, "implicit_accuracy": implicit, "loglik_accuracy": scores["preference_accuracy"],
           **{k: scores[k] for k in ("correctness", "instruction_following", "safety", "over_refusal")},
           "final_loss": float(np.mean(losses)) if losses else float("nan"),
           "seconds": time.time() - t0, "flipped": files["flipped"], "train_file": cfg.data.train,
           "signature": _signature(cfg, c)}
    with open(done + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(done + ".tmp", done)
    shutil.rmtree(os.path.join(rd, "checkpoints"), ignore_errors=True)  # done: the export and result.json remain
    print(f"[{name}] gold reward {res['gold_reward']:.3f}, preference accuracy {res['preference_accuracy']:.3f} "
          f"({kind}), {res['seconds']:.0f}s", flush=True)
    return res


def csv_rows(results: list[tuple[str, float, int, dict]]) -> list[dict]:
    """One row per grid cell (method, eps, seed); shared runs (cDPO/rDPO at ε = 0) keep the cell's method."""
    return [{**{k: r.get(k, "") for k in CSV_FIELDS}, "method": m, "eps": e, "seed": s} for m, e, s, r in results]


def write_csv(path: str, rows: list[dict]) -> None:
    ab.write_csv(path, rows, CSV_FIELDS)


# ------------------------------------------------------------------------------------------------ summaries


def aggregate(rows: list[dict], keys=("gold_reward", "preference_accuracy")) -> dict:
    """{(method, eps): {key: (mean, sample std (ddof 1; 0 with one seed), n), "seeds": {seed: row}}}."""
    return ab.aggregate(rows, ("method", "eps"), keys)


def drop(agg: dict, method: str, key: str, eps_lo: float, eps_hi: float) -> tuple[float, float, int] | None:
    """The loss of `key` from eps_lo to eps_hi, per seed (same seed = same data order; the flips at eps_lo are a
    subset of those at eps_hi), as (mean, sample std, seeds). None when a cell or a common seed is missing."""
    a, b = agg.get((method, eps_lo)), agg.get((method, eps_hi))
    if a is None or b is None:
        return None
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    if not seeds:
        return None
    d = np.array([float(a["seeds"][s][key]) - float(b["seeds"][s][key]) for s in seeds])
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0, len(d)


def seeds_where_smaller(agg: dict, a: str, b: str, key: str, eps_lo: float, eps_hi: float) -> tuple[int, int] | None:
    """(number of seeds where method a's drop of `key` from eps_lo to eps_hi is smaller than method b's, number of
    seeds both have); None when a cell is missing."""
    cells = [agg.get((m, e)) for m in (a, b) for e in (eps_lo, eps_hi)]
    if any(x is None for x in cells):
        return None
    seeds = sorted(set.intersection(*(set(x["seeds"]) for x in cells)))
    dr = [[float(cells[2 * i]["seeds"][s][key]) - float(cells[2 * i + 1]["seeds"][s][key]) for s in seeds]
          for i in range(2)]
    return sum(x < y for x, y in zip(*dr)), len(seeds)


def compare(d_orpo, d_other) -> str:
    """'smaller' / 'larger' when the ± 1 std intervals of two drops do not overlap, else 'indistinguishable'."""
    (m1, s1, _), (m2, s2, _) = d_orpo, d_other
    if m1 + s1 < m2 - s2:
        return "smaller"
    if m1 - s1 > m2 + s2:
        return "larger"
    return "indistinguishable"


def orpo_answer(agg: dict, eps_values, methods) -> str:
    """The answer to "is ORPO more robust to flipped labels than the others?" from the numbers: per metric, ORPO's
    drop from the smallest to the largest ε against each other method's (± 1 std over seeds, paired by seed), and
    the levels at the largest ε."""
    lo, hi = min(eps_values), max(eps_values)
    if "ORPO" not in methods or lo == hi:
        return "Not answered: the run has no ORPO or a single ε."
    others = [m for m in methods if m != "ORPO"]
    lines, verdicts = [], []
    for key, label in METRICS:
        d_orpo = drop(agg, "ORPO", key, lo, hi)
        if d_orpo is None:
            return "Not answered: ORPO's cells at the smallest and the largest ε are missing."
        n = d_orpo[2]
        parts = []
        for m in others:
            d = drop(agg, m, key, lo, hi)
            if d is None:
                continue
            parts.append(f"{m} {d[0]:+.3f} ± {d[1]:.3f} ({compare(d_orpo, d)})")
            if m == "DPO":
                verdicts.append(compare(d_orpo, d))
        short = label.split(" (")[0]
        lines.append(f"- {short}: from ε = {lo:g} to ε = {hi:g} ORPO loses {d_orpo[0]:+.3f} ± {d_orpo[1]:.3f} "
                     f"({n} seeds; ORPO's drop vs theirs: " + (", ".join(parts) or "no other method") + ").")
        wins = seeds_where_smaller(agg, "ORPO", "DPO", key, lo, hi)
        if wins is not None:
            lines.append(f"  Paired by seed, ORPO's drop is smaller than DPO's in {wins[0]} of {wins[1]} seeds.")
        at_hi = sorted(((agg[(m, hi)][key][0], m) for m in methods if (m, hi) in agg), reverse=True)
        lines.append(f"  At ε = {hi:g}, {short} ranks: " + ", ".join(f"{m} {v:.3f}" for v, m in at_hi) + ".")
    same = []  # the same accuracy for both (runs.csv has both for every run), when aggregated
    for key, what in (("loglik_accuracy", "log-likelihood accuracy"), ("implicit_accuracy", "implicit-reward "
                                                                        "accuracy against the SFT model")):
        d_o, d_d = (drop(agg, m, key, lo, hi) if key in agg.get((m, lo), {}) else None for m in ("ORPO", "DPO"))
        if d_o is not None and d_d is not None:
            same.append(f"{what}: ORPO {d_o[0]:+.3f} ± {d_o[1]:.3f}, DPO {d_d[0]:+.3f} ± {d_d[1]:.3f} "
                        f"({compare(d_o, d_d)})")
    if same:
        lines.append("- The same accuracy for both, drop from ε = {:g} to {:g}: ".format(lo, hi) + "; ".join(same)
                     + " (not part of the verdict).")
    if n < 2:
        verdict = "Inconclusive: a single seed gives no error bar."
    elif verdicts and all(v == "smaller" for v in verdicts):
        verdict = ("Supported at this size: ORPO's drop is smaller than DPO's on both metrics, beyond ± 1 std "
                   "over seeds.")
    elif verdicts and all(v == "larger" for v in verdicts):
        verdict = "Not supported: ORPO's drop is larger than DPO's on both metrics, beyond ± 1 std over seeds."
    elif verdicts and "smaller" in verdicts and "larger" not in verdicts:
        verdict = ("Partly supported: ORPO's drop is smaller than DPO's on one metric beyond ± 1 std, and not "
                   "distinguishable on the other.")
    elif verdicts and "larger" in verdicts and "smaller" not in verdicts:
        verdict = ("Not supported: ORPO's drop is larger than DPO's on one metric beyond ± 1 std, and not "
                   "distinguishable on the other.")
    elif verdicts and "smaller" in verdicts and "larger" in verdicts:
        verdict = "Mixed: ORPO's drop is smaller than DPO's on one metric and larger on the other (± 1 std)."
    elif verdicts:
        verdict = ("Inconclusive at this size: ORPO's and DPO's drops are within each other's ± 1 std error bars "
                   "on both metrics.")
    else:
        verdict = "Not answered against DPO (DPO not in the run); see the comparisons above."
    return "\n".join([f"**Does ORPO's claimed robustness to label noise hold? {verdict}**", ""] + lines)


def _cell(agg, m, e, key) -> str:
    if (m, e) not in agg:
        return "—"
    mean, std, n = agg[(m, e)][key]
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def markdown(agg: dict, sft: dict, c, seconds: float, n_pairs: int) -> str:
    eps = sorted(c.eps)
    lines = ["# Preference-label noise on the toy task: gold reward and held-out preference accuracy vs flip rate ε",
             "",
             f"Shared SFT start (seed {FLAGS.seed}); per cell a preference stage of {c.steps} steps x "
             f"{c.batch_size} pairs (AdamW lr {c.learning_rate:g}, linear decay, β = {c.beta:g}) on the "
             f"{n_pairs} training pairs with a fraction ε of chosen/rejected swapped (soft labels: p → 1 − p on the "
             f"same pairs); cDPO and rDPO know ε. Mean ± sample std (ddof 1) over seeds "
             f"{', '.join(map(str, c.seeds))} (data order and flipped pairs; the SFT model is shared). Evaluated "
             f"on clean held-out data: {c.eval_prompts} prompts answered greedily, {c.eval_pairs or 300} pairs. "
             f"Wall time {seconds:.0f} s for this invocation (runs finished earlier are read back, not rerun).", ""]
    for key, label in METRICS:
        lines += [f"## {label}", "",
                  "| method | " + " | ".join(f"ε = {e:g}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
        for m in c.methods:
            lines.append(f"| {m} | " + " | ".join(_cell(agg, m, e, key) for e in eps) + " |")
        if key == "gold_reward":
            lines.append(f"| SFT (start) | {sft['gold_reward']:.3f} |" + " |" * (len(eps) - 1))
        else:
            lines.append(f"| SFT (start), log-likelihood | {sft['preference_accuracy']:.3f} |" + " |" * (len(eps) - 1))
        lines.append("")
    lines += ["Preference accuracy: implicit reward log π/π_SFT of chosen > rejected for the DPO family (DPO, cDPO, "
              "rDPO, IPO, soft); policy log-likelihood log π(chosen) > log π(rejected) for ORPO (no reference "
              "model). Both accuracies of every run are in runs.csv. cDPO and rDPO at ε = 0 are DPO's run.", "",
              "## ORPO and label noise", "", orpo_answer(agg, eps, c.methods), "",
              "A drop is the per-seed difference metric(ε_min) − metric(ε_max), mean ± std over seeds; two drops "
              "are called different only when their ± 1 std intervals do not overlap. ORPO's drop in preference "
              "accuracy is of its log-likelihood accuracy, DPO's of its implicit-reward accuracy.", "",
              f"The verdict holds for this training length ({c.steps} steps of {c.batch_size} pairs) only: under "
              "noise DPO learns more slowly, and at 40 steps ORPO's gold-reward drop was the smaller one, at 120 "
              "DPO's (experiments/label_noise.py, docstring section \"Training length\").", ""]
    return "\n".join(lines)


def plot(agg: dict, sft: dict, c, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = np.array(sorted(c.eps))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.007 * (eps.max() - eps.min() if eps.max() > eps.min() else 0.4) / 0.4
    for ax, (key, label) in zip(axes, METRICS):
        for i, m in enumerate(c.methods):
            es = [e for e in eps if (m, float(e)) in agg]
            mean = [agg[(m, float(e))][key][0] for e in es]
            std = [agg[(m, float(e))][key][1] for e in es]
            off = (i - (len(c.methods) - 1) / 2) * width  # small offsets so the error bars do not hide each other
            ax.errorbar(np.array(es) + off, mean, yerr=std, marker="o", ms=4, capsize=3, label=m)
        base = sft["gold_reward"] if key == "gold_reward" else sft["preference_accuracy"]
        ax.axhline(base, color="gray", ls="--", lw=1,
                   label="SFT start" + ("" if key == "gold_reward" else " (log-likelihood)"))
        ax.set_xlabel("flip rate ε (fraction of training pairs with chosen/rejected swapped)")
        ax.set_ylabel(label)
        ax.set_xticks(eps)
        ax.grid(alpha=0.3)
    axes[1].set_title("DPO family: implicit-reward accuracy; ORPO: log-likelihood", fontsize=9)
    axes[0].set_title("greedy answers to held-out prompts, scored by the toy task", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Label noise on the toy task: {c.steps} steps from a shared SFT model; error bars = ± std over "
                 f"{len(c.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def config_from_flags():
    c = get_config(FLAGS.size)
    if FLAGS.grid == "full":
        c.methods, c.eps, c.seeds = tuple(METHODS), FULL_EPS, (0, 1, 2)
    elif FLAGS.grid:
        raise UserError(f"--grid must be '' or 'full', got {FLAGS.grid!r}")
    if FLAGS.methods:
        unknown = [m for m in FLAGS.methods if m not in METHODS]
        if unknown:
            raise UserError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        c.methods = tuple(FLAGS.methods)
    if FLAGS.eps:
        c.eps = tuple(float(e) for e in FLAGS.eps)
    for e in c.eps:
        if not 0.0 <= e < 0.5:
            raise UserError(f"--eps: {e} is not in [0, 0.5)")
    if FLAGS.seeds:
        c.seeds = tuple(int(s) for s in FLAGS.seeds)
    c.steps = FLAGS.steps or c.steps
    if FLAGS.sft_steps:
        c.sft_steps = FLAGS.sft_steps
    if FLAGS["eval_prompts"].present:
        c.eval_prompts = FLAGS.eval_prompts
    return c


def run(c, wd: str) -> dict:
    t0 = time.time()
    os.makedirs(wd, exist_ok=True)
    sft_path = tp.sft_stage(wd, c.sft_steps)
    toy_dir, data_dir = os.path.join(wd, "toy_data"), os.path.join(wd, "tfds")
    sft_file = os.path.join(wd, f"sft_eval_{c.eval_prompts}_{c.eval_pairs}.json")
    if os.path.exists(sft_file):
        with open(sft_file) as f:
            sft = json.load(f)
    else:
        sft = tp.evaluate_policy(sft_path, eval_dir(wd, c), c.eval_prompts, data_dir)
        with open(sft_file, "w") as f:
            json.dump(sft, f, indent=2)
    if FLAGS.jobs != 1:
        ab.parallel_cells(FLAGS.jobs, wd)  # the grid's cells, cached: the loop below reads them
    results = []
    # seed-major: an interrupted default run already has every method for the first seeds
    cells = [(m, float(e), seed) for seed in c.seeds for e in c.eps for m in c.methods]
    runs = list(dict.fromkeys(run_name(*cell) for cell in cells))  # cDPO / rDPO at ε = 0 are DPO's run: once
    for m, e, seed in cells:
        if not ab.in_shard(runs.index(run_name(m, e, seed)), FLAGS.shard):
            continue
        results.append((m, e, seed, one_run(m, e, seed, wd, sft_path, c)))
        if not FLAGS.shard:
            write_csv(os.path.join(wd, "runs.csv"), csv_rows(results))
    if FLAGS.shard:  # a child of --jobs: its cells are cached; the parent writes the report
        return {}
    rows = csv_rows(results)
    agg = aggregate(rows, keys=("gold_reward", "preference_accuracy", "loglik_accuracy", "implicit_accuracy"))
    with open(os.path.join(toy_dir, "pairs.jsonl")) as f:
        n_pairs = sum(1 for _ in f)
    n_pairs = min(n_pairs, c.train_pairs or n_pairs)
    seconds = time.time() - t0
    md = markdown(agg, sft, c, seconds, n_pairs)
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write(md + "\n")
    summary = [{"method": m, "eps": e, **{k: list(v[k]) for k, _ in METRICS}} for (m, e), v in sorted(agg.items())]
    out = {"config": c.to_dict(), "seconds": seconds, "sft": {k: v for k, v in sft.items() if k != "samples"},
           "cells": summary, "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    with open(os.path.join(wd, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    plot(agg, sft, c, os.path.join(wd, "results.png"))
    print(md + f"\n\n(total {seconds:.0f}s; {wd}/results.md, results.png, runs.csv)")
    return out


def main(argv):
    del argv
    from align_jax import cli

    cli.pin_threads(FLAGS.threads)
    cli.console(cli.verbose_from_env())
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the many same-shaped runs compile their steps once
        jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cli.run(lambda: run(config_from_flags(), FLAGS.workdir), cli.verbose_from_env())


if __name__ == "__main__":
    from absl import app

    app.run(main)
