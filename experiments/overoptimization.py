"""Reward-model overoptimisation on the toy task: gold vs proxy reward against d = √KL for best-of-n and PPO, with
proxy reward models trained on different amounts of preference data, and the paper's functional forms fitted.

    python experiments/overoptimization.py --workdir=/tmp/align_jax_overopt                 # default size (docstring)
    python experiments/overoptimization.py --workdir=/tmp/overopt_tiny --size=tiny          # seconds, the test's size
    python experiments/overoptimization.py --workdir=... --rm_pairs=30,250,2000 --kl_coefs=0,0.05 --seeds=0,1,2,3

Paper. Gao, Schulman, Hilton, "Scaling Laws for Reward Model Overoptimization" (ICML 2023), Fig. 1 and §3: optimise
a policy against a proxy reward model (RM) and measure a "gold" reward the proxy was trained to imitate; as the
optimisation moves away from the initial policy (d = √KL(π‖π_init), nats) the proxy keeps rising while the gold
reward peaks and falls. Best-of-n (KL_bon = log n − (n−1)/n): R_gold(d) = d(α_bon − β_bon·d); RL (PPO):
R_gold(d) = d(α_RL − β_RL·log d), both relative to the initial policy. Larger RMs (parameters or, their §3.4 /
Fig. 6, more training data) overoptimise less: higher peaks further out.

Setting. The embedded toy task (experiments/toy_pipeline.py): its programmatic gold reward (align_jax/data/toy/
scoring.py; max 1.5, refusal/leak penalties) plays the paper's gold RM. One shared SFT stage (`toy_pipeline.sft_stage`,
400 steps, seed --seed) is the initial policy π_init, sampled at temperature 1 throughout. Proxies: configs/
reward_model.py (Bradley-Terry with the toy pairs' soft labels, chosen_prob = σ(Δgold/1.5)) started from the SFT
export, trained on the first n of the 2000 training pairs (written to <workdir>/subsets/ as label_noise.py writes
its noisy files), the same number of optimizer steps for every n (few pairs = many epochs); held-out accuracy on the
toy task's 300 held-out pairs. A proxy score r is shown on the gold scale as 1.5·(r − r̄_init), r̄_init its mean on
π_init's samples (a calibrated BT model on these labels has r = gold/1.5 + const); gold as gold − gold̄_init.
  Best-of-n, on held-out prompts: a pool of N samples per prompt from π_init; for each n the expected gold and proxy
of the proxy's best of n by the unbiased estimator over the pool (Gao et al. App. I / Nakano et al.: the i-th of the
pool ranked by proxy is the best of a random n-subset with probability C(i−1, n−1)/C(N, n)); d from the analytic
KL_bon. Because toy completions repeat (a pool of 64 holds ~15-20 distinct answers), the analytic KL overstates the
true one (it is exact only without ties); runs.csv has the KL of best-of-n over the pool's empirical distribution
too (`kl_pool`, ties handled exactly), not used for the fit.
  PPO: configs/ppo.py with ppo.reward_model = the proxy (as experiments/toy_rlhf.py), value model from the proxy,
temperature 1 (π_init's sampling distribution), KL coefficient(s) `kl_coefs`; every rollout's completions are
logged (samples.jsonl) and scored by the gold reward; KL = the logged objective/kl (Σ_t log π/π_init over the
rollout's samples, nats per completion), proxy = objective/scores. Rollouts are grouped into windows; d = √(window
mean KL). These are training prompts (toy:prompts), so R_init for PPO is measured on π_init's samples of the same
prompts (`ppo_base_samples` per prompt).
  Fits: ordinary least squares without intercept (R(0) = 0) of the gold Δ per (RM size, seed): best-of-n on
the pool's n values, RL on the windows; coefficients reported as mean ± std over seeds with the fitted peak
(bon: d* = α/2β; RL: d* = exp(α/β − 1)). Seed s = RM seed (head init, data order) = pool sampling seed = PPO seed.

Default size: RMs on n ∈ {60, 250, 1000} pairs x seeds 0, 1, 2 (60 steps of 16 pairs, lr 1e-4); best-of-n on 128
held-out prompts x a pool of 64 per seed, n ∈ {1, 2, 4, 8, 16, 32}; PPO for every RM (9 runs: 64 steps = 16
rollouts of 32 prompts, 4 epochs each, lr 3e-4, KL coefficient 0, 4 windows of 4 rollouts). Time: the default
command took 8 min 49 s end to end on one core of this 2-core machine (2026-11-30; the other core ran another
experiment). `--kl_coefs=0,0.05` adds a PPO
curve per coefficient (+9 runs).

Measured at the default size (results.md; mean ± std over seeds 0-2; Δ relative to π_init's samples, gold units):

    RM pairs (held-out acc)   best-of-n gold Δ at n = 8 (d 1.10) / n = 32 (d 1.58)   proxy Δ at n = 32   fit α, β
    60    (0.788 ± 0.025)     0.345 ± 0.075 / 0.201 ± 0.142                          0.819 ± 0.096       0.659 ± 0.064, 0.331 ± 0.020
    250   (0.856 ± 0.005)     0.410 ± 0.035 / 0.296 ± 0.070                          0.753 ± 0.059       0.725 ± 0.011, 0.336 ± 0.026
    1000  (0.841 ± 0.029)     0.392 ± 0.048 / 0.259 ± 0.106                          0.713 ± 0.059       0.719 ± 0.023, 0.347 ± 0.038
    PPO (KL coef 0), last window: d = 2.34 ± 0.67 / 1.58 ± 0.14 / 1.64 ± 0.18, gold Δ 0.248 ± 0.138 / 0.335 ± 0.111 /
    0.353 ± 0.100 (peak 0.302 ± 0.084 at d 0.82 for 60 pairs), proxy Δ 0.629 / 0.542 / 0.522, rising in every window.

Verdict. Best-of-n reproduces Fig. 1's shape: for every RM size gold Δ peaks at n = 8 (d ≈ 1.1; in 9 of 9 RM x
seed curves) and falls by n = 32 while the proxy rises monotonically, and the paper's form d(α − β·d) fits (peak
d* 1.00-1.08). Less data overoptimises more: the 60-pair RM's peak is the lowest and its α the smallest (0.659 vs
0.72); 250 and 1000 pairs are not distinguishable (nor are their RMs: at 60 steps x 16 pairs the 1000-pair RM sees
each pair < once, accuracy 0.841 vs 0.856), so "larger RMs overoptimise less" holds between the smallest and the
others only. PPO: the proxy rises throughout; gold rises then flattens, and only for the 60-pair RM does it turn
down (0.302 → 0.248 at the largest KL, within the error bars: not a clear fall); the RL form's fits are noisy
(β 0.19 ± 0.05 to ± 0.20; one seed of 250 pairs has no peak). 64 PPO steps reach d ≈ 1.6-2.3 only.

What differs from the paper. Gold is a program, not a 6B RM; proxies differ in training data only (all 0.82 M
parameters), and the largest has 1000 pairs, not 10^5; the pool is 64 (the paper: up to 60k for n up to 60k, here
d ≤ 1.6); PPO runs 64 steps, reaching KL of a few nats; one SFT model; no RM ensembles.

Writes to --workdir: runs.csv (every best-of-n point and PPO window per RM size x seed), results.md (table,
fitted coefficients mean ± std over seeds, answers), results.json (config, numbers, command, seconds), results.png
(gold and proxy Δ vs d, best-of-n and PPO panels, fitted curves, error bars = std over seeds). Each RM, pool and
PPO run is cached (<workdir>/runs/<name>/result.json, ab.cached_run): a rerun trains nothing; an interrupted one
resumes.
"""

from __future__ import annotations

import json
import math
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
flags.DEFINE_list("rm_pairs", None, "Override the proxies' training-set sizes (first n of the toy pairs).")
flags.DEFINE_list("seeds", None, "Override the seeds (RM seed = pool seed = PPO seed); the SFT seed is --seed.")
flags.DEFINE_list("kl_coefs", None, "Override PPO's KL coefficients.")
flags.DEFINE_integer("ppo_steps", 0, "Override PPO's optimizer steps (0 = the size's default).")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "/tmp/align_jax_overopt")

BT_TEMPERATURE = 1.5  # align_jax/data/toy/datasets.py: chosen_prob = sigmoid(Δgold / 1.5)
CSV_FIELDS = ["method", "rm_pairs", "seed", "kl_coef", "point", "n", "steps", "kl", "d", "kl_pool", "gold",
              "proxy", "gold_delta", "proxy_delta", "samples", "rm_accuracy"]


def get_config(arg: str = ""):
    """The experiment's config; `arg="tiny"`: 2 RM sizes x 1 seed, a few steps (the test's size)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.rm_pairs = (60, 250, 1000)
    c.seeds = (0, 1, 2)
    c.sft_steps = 0  # 0 = configs/sft.py's default (400)
    c.rm_steps = 60
    c.rm_batch_size = 16
    c.rm_learning_rate = 1e-4
    c.eval_pairs = 0  # 0 = the 300 held-out pairs
    c.temperature = 1.0
    c.max_new_tokens = 12  # configs/ppo.py's response_length
    c.bon_prompts = 128
    c.bon_pool = 64
    c.bon_n = (1, 2, 4, 8, 16, 32)
    c.ppo_kl_coefs = (0.0,)
    c.ppo_rm_pairs = ()  # the RM sizes that get PPO runs; () = all of rm_pairs
    c.ppo_steps = 64
    c.ppo_batch_size = 32
    c.ppo_epochs = 4
    c.ppo_learning_rate = 3e-4
    c.ppo_windows = 4
    c.ppo_base_prompts = 1000  # π_init on the PPO prompts: its gold and proxy means (R_init of PPO)
    c.ppo_base_samples = 2
    if arg == "tiny":
        c.rm_pairs = (16, 48)
        c.seeds = (0,)
        c.sft_steps = 2
        c.rm_steps = 2
        c.rm_batch_size = 8
        c.eval_pairs = 16
        c.bon_prompts = 6
        c.bon_pool = 8
        c.bon_n = (1, 2, 4)
        c.ppo_rm_pairs = (16,)
        c.ppo_steps = 4
        c.ppo_batch_size = 8
        c.ppo_epochs = 1
        c.ppo_windows = 2
        c.ppo_base_prompts = 8
        c.ppo_base_samples = 2
    elif arg:
        raise UserError(f"unknown size {arg!r}; use '' or 'tiny'")
    return c


# ---------------------------------------------------------------------------------------------- pure helpers


def kl_bon(n) -> np.ndarray:
    """Analytic KL(best-of-n ‖ π) = log n − (n−1)/n (nats; exact for a continuous proxy, an upper bound with ties)."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1) / n


def bon_weights(N: int, n: int) -> np.ndarray:
    """[N] probabilities that the i-th smallest of N (i = 1..N) is the largest of a uniformly random n-subset:
    C(i−1, n−1) / C(N, n)."""
    if not 1 <= n <= N:
        raise ValueError(f"n = {n} must be in [1, {N}]")
    return np.array([math.comb(i - 1, n - 1) for i in range(1, N + 1)], np.float64) / math.comb(N, n)


def bon_estimate(proxy, gold, n: int) -> tuple[float, float]:
    """Unbiased estimates over a pool [P, N] (prompts x samples) of E[gold] and E[proxy] of the proxy's best of n
    samples, averaged over prompts. Ties of the proxy (identical completions) share their gold, so the order
    among them does not matter."""
    proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
    w = bon_weights(proxy.shape[1], n)
    order = np.argsort(proxy, axis=1, kind="stable")
    g = (np.take_along_axis(gold, order, 1) * w).sum(1)
    p = (np.take_along_axis(proxy, order, 1) * w).sum(1)
    return float(g.mean()), float(p.mean())


def kl_bon_pool(proxy, n: int) -> float:
    """KL(best-of-n ‖ π) with π the empirical distribution of each prompt's pool (equal proxy scores = one outcome),
    averaged over prompts: for outcomes sorted by score with probabilities p_k and CDF F_k,
    P_bon(k) = F_k^n − F_{k−1}^n, KL = Σ_k P_bon(k) log(P_bon(k)/p_k)."""
    out = []
    for row in np.asarray(proxy, np.float64):
        _, counts = np.unique(row, return_counts=True)  # sorted ascending
        p = counts / counts.sum()
        F = np.cumsum(p)
        pb = F ** n - np.concatenate([[0.0], F[:-1]]) ** n
        ok = pb > 0
        out.append(float((pb[ok] * np.log(pb[ok] / p[ok])).sum()))
    return float(np.mean(out))


def fit_bon(d, r) -> tuple[float, float]:
    """Least squares (no intercept) of r ≈ d(α − β·d): returns (α, β)."""
    d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
    X = np.stack([d, -d * d], 1)
    (a, b), *_ = np.linalg.lstsq(X, r, rcond=None)
    return float(a), float(b)


def fit_rl(d, r) -> tuple[float, float]:
    """Least squares (no intercept) of r ≈ d(α − β·log d) over the points with d > 0: returns (α, β)."""
    d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
    keep = d > 0
    d, r = d[keep], r[keep]
    X = np.stack([d, -d * np.log(d)], 1)
    (a, b), *_ = np.linalg.lstsq(X, r, rcond=None)
    return float(a), float(b)


def bon_form(d, a, b):
    d = np.asarray(d, np.float64)
    return d * (a - b * d)


def rl_form(d, a, b):
    d = np.asarray(d, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (a - b * np.log(np.where(d > 0, d, 1.0))), 0.0)


def peak(kind: str, a: float, b: float) -> tuple[float, float]:
    """(d*, R(d*)) of a fitted form; (inf, inf) when it has no maximum (β <= 0)."""
    if b <= 0:
        return math.inf, math.inf
    if kind == "bon":
        d = a / (2 * b)
        return d, float(bon_form(d, a, b))
    d = math.exp(a / b - 1)
    return d, float(rl_form(d, a, b))


def windows(rollouts: list[dict], k: int) -> list[dict]:
    """Rollouts (each {"kl", "proxy", "gold", "samples"}) cut into k consecutive windows of equal length (the first
    windows get one more when it does not divide): per window the mean KL, sample-weighted gold and proxy means."""
    out = []
    for part in np.array_split(np.arange(len(rollouts)), k):
        rs = [rollouts[i] for i in part]
        if not rs:
            continue
        w = np.array([r["samples"] for r in rs], np.float64)
        out.append({"kl": float(np.mean([r["kl"] for r in rs])),
                    "gold": float(np.dot(w, [r["gold"] for r in rs]) / w.sum()),
                    "proxy": float(np.dot(w, [r["proxy"] for r in rs]) / w.sum()),
                    "samples": int(w.sum()), "steps": (rs[0]["step"], rs[-1]["step"])})
    return out


# ---------------------------------------------------------------------------------------------- data and pools


def subset_file(wd: str, name: str, n: int) -> str:
    """<wd>/subsets/<name>_n<n>.jsonl: the first n records of the toy task's <name>.jsonl (written once)."""
    from align_jax.data.toy import read_jsonl

    out = os.path.join(wd, "subsets", f"{name}_n{n}.jsonl")
    if not os.path.exists(out):
        rows = read_jsonl(os.path.join(wd, "toy_data", f"{name}.jsonl"))
        if n > len(rows):
            raise UserError(f"--rm_pairs: {n} > the {len(rows)} records of the toy task's {name}.jsonl")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        ab.write_jsonl_atomic(out, rows[:n])
    return out


def sample_pool(sft_path: str, prompts: list, N: int, seed: int, c) -> list[list[str]]:
    """N completions per prompt from π_init at temperature c.temperature (rows: prompts)."""
    from align_jax.evaluation import generate_completions
    from align_jax.models import load_pretrained
    from transformers import AutoTokenizer

    model, tok = load_pretrained(sft_path), AutoTokenizer.from_pretrained(sft_path)
    rep = [p for p in prompts for _ in range(N)]
    comps = generate_completions(model, tok, rep, batch_size=min(256, len(rep)), max_new_tokens=c.max_new_tokens,
                                 greedy=False, temperature=c.temperature, seed=seed)
    return [comps[i * N:(i + 1) * N] for i in range(len(prompts))]


def pool(wd: str, sft_path: str, kind: str, seed: int, c) -> dict:
    """The cached pool of π_init's samples: kind "bon" (held-out prompts, bon_prompts x bon_pool) or "base" (the PPO
    prompts, ppo_base_prompts x ppo_base_samples). {"prompts": [...], "completions": [[...]], "gold": [[...]]}."""
    from align_jax.data.toy import read_jsonl
    from align_jax.data.toy.scoring import gold_reward

    if kind == "bon":
        file, P, N, salt = "eval_prompts", c.bon_prompts, c.bon_pool, 0
    else:
        file, P, N, salt = "prompts", c.ppo_base_prompts, c.ppo_base_samples, 1
    sig = {"P": P, "N": N, "temperature": c.temperature, "max_new_tokens": c.max_new_tokens,
           "sft_steps": c.sft_steps, "sft_seed": FLAGS.seed}

    def compute():
        prompts = [r["prompt"] for r in read_jsonl(os.path.join(wd, "toy_data", f"{file}.jsonl"))][:P]
        comps = sample_pool(sft_path, prompts, N, (2 * seed + salt) * 10**6, c)
        gold = [[gold_reward(p, x) for x in row] for p, row in zip(prompts, comps)]
        print(f"[pool {kind} seed {seed}] {P} prompts x {N} samples, gold {np.mean(gold):.3f}", flush=True)
        return {"prompts": prompts, "completions": comps, "gold": gold}

    return ab.cached_run(os.path.join(wd, "runs", f"pool_{kind}_seed{seed}"), sig, compute)


_TOKENS: dict = {}


def score_pool(rm_path: str, pl: dict, key: str) -> np.ndarray:
    """Proxy scores [P, N] of a pool: each distinct (prompt, completion) tokenized once (as the reward model's
    training data, `RewardModelReward.tokenize`) and scored once."""
    from align_jax.rl.reward_model import RewardModelReward

    rm = RewardModelReward(rm_path, batch_size=256, length_buckets=(32, 48, 64))
    if key not in _TOKENS:
        uniq, index = {}, []
        for i, (p, row) in enumerate(zip(pl["prompts"], pl["completions"])):
            index.append([uniq.setdefault((i, x), len(uniq)) for x in row])
        rows = [None] * len(uniq)
        for (i, x), j in uniq.items():
            rows[j] = rm.tokenize(pl["prompts"][i], x)
        _TOKENS[key] = (rows, np.array(index))
    rows, index = _TOKENS[key]
    return rm.score_ids(rows)[index].astype(np.float64)


# ---------------------------------------------------------------------------------------------- runs


def rm_run(wd: str, sft_path: str, n: int, seed: int, c) -> dict:
    """A proxy RM on the first n training pairs (cached). Returns {"accuracy", "export", "seconds"}."""
    from align_jax.train import train

    rd = os.path.join(wd, "runs", f"rm_n{n}_seed{seed}")
    sig = {"n": n, "steps": c.rm_steps, "batch_size": c.rm_batch_size, "lr": c.rm_learning_rate,
           "eval_pairs": c.eval_pairs, "sft_steps": c.sft_steps, "sft_seed": FLAGS.seed}

    def compute():
        t0 = time.time()
        cfg = ab.load_config("reward_model", wd, seed)
        cfg.model.init_from = sft_path
        cfg.data.train = subset_file(wd, "pairs_soft", n)
        cfg.data.eval = subset_file(wd, "eval_pairs", c.eval_pairs) if c.eval_pairs else \
            os.path.join(wd, "toy_data", "eval_pairs.jsonl")
        cfg.data.max_length = 64
        cfg.data.length_buckets = (32, 48, 64)
        cfg.batch_size = c.rm_batch_size
        cfg.total_steps = c.rm_steps
        cfg.optimizer.learning_rate = c.rm_learning_rate
        cfg.eval_every = c.rm_steps
        cfg.checkpoint.every_steps = c.rm_steps
        cfg.progress_bar = False
        cfg.log_every = max(c.rm_steps // 2, 1)
        print(f"[rm_n{n}_seed{seed}] training a reward model on {n} pairs", flush=True)
        train(cfg, rd)
        _, evals = tp.read_metrics(os.path.join(rd, "metrics.jsonl"))
        acc = evals[-1]["eval/accuracy"]
        print(f"[rm_n{n}_seed{seed}] held-out accuracy {acc:.3f}", flush=True)
        return {"accuracy": acc, "seconds": time.time() - t0}

    res = ab.cached_run(rd, sig, compute)
    return {**res, "export": os.path.join(rd, "export")}


def ppo_rollouts(rd: str) -> list[dict]:
    """Per rollout of a finished PPO run: {"step", "kl", "proxy", "gold", "samples"} from metrics.jsonl
    (objective/kl, objective/scores) and samples.jsonl (every completion, scored by the gold reward)."""
    from align_jax.data.toy.scoring import gold_reward

    with open(os.path.join(rd, "metrics.jsonl")) as f:
        metrics = {}
        for line in f:
            m = json.loads(line)
            if "objective/kl" in m:
                metrics.setdefault(m["step"], m)
    gold: dict = {}
    with open(os.path.join(rd, "samples.jsonl")) as f:
        for line in f:
            s = json.loads(line)
            prompt = s["prompt"][len("user: "):] if s["prompt"].startswith("user: ") else s["prompt"]
            gold.setdefault(s["step"], []).append(gold_reward(prompt, s["completion"]))
    return [{"step": st, "kl": m["objective/kl"], "proxy": m["objective/scores"], "gold": float(np.mean(gold[st])),
             "samples": len(gold[st])} for st, m in sorted(metrics.items()) if st in gold]


def ppo_run(wd: str, sft_path: str, rm: dict, n: int, seed: int, kl_coef: float, c) -> dict:
    """PPO against the proxy (cached): {"rollouts": [...], "seconds"}."""
    from align_jax.train import train

    rd = os.path.join(wd, "runs", f"ppo_n{n}_seed{seed}_kl{kl_coef:g}")
    sig = {"n": n, "kl_coef": kl_coef, "steps": c.ppo_steps, "batch_size": c.ppo_batch_size, "epochs": c.ppo_epochs,
           "lr": c.ppo_learning_rate, "temperature": c.temperature, "rm": rm["signature"]}

    def compute():
        t0 = time.time()
        cfg = ab.load_config("ppo", wd, seed)
        cfg.model.init_from = sft_path
        cfg.ppo.reward_model = rm["export"]
        cfg.ppo.kl_coef = kl_coef
        cfg.ppo.temperature = c.temperature
        cfg.ppo.response_length = c.max_new_tokens
        cfg.ppo.num_ppo_epochs = c.ppo_epochs
        cfg.ppo.log_completions_every = c.ppo_epochs  # every rollout, all of its completions
        cfg.ppo.num_completions_to_log = c.ppo_batch_size
        cfg.batch_size = c.ppo_batch_size
        cfg.total_steps = c.ppo_steps
        cfg.optimizer.learning_rate = c.ppo_learning_rate
        cfg.checkpoint.every_steps = c.ppo_steps
        cfg.eval_generation = 0
        cfg.export = False
        cfg.progress_bar = False
        cfg.log_every = max(c.ppo_steps // 4, 1)
        print(f"[ppo_n{n}_seed{seed}_kl{kl_coef:g}] PPO against the proxy, {c.ppo_steps} steps", flush=True)
        train(cfg, rd)
        return {"rollouts": ppo_rollouts(rd), "seconds": time.time() - t0}

    return ab.cached_run(rd, sig, compute)


# ---------------------------------------------------------------------------------------------- main loop


def run(c, wd: str) -> dict:
    t0 = time.time()
    os.makedirs(wd, exist_ok=True)
    sft_path = tp.sft_stage(wd, c.sft_steps)
    rows = []
    for seed in c.seeds:
        bon_pool = pool(wd, sft_path, "bon", seed, c)
        base_pool = pool(wd, sft_path, "base", seed, c) if c.ppo_kl_coefs else None
        bon_gold = np.asarray(bon_pool["gold"], np.float64)
        for n_pairs in c.rm_pairs:
            rm = rm_run(wd, sft_path, n_pairs, seed, c)
            common = {"rm_pairs": n_pairs, "seed": seed, "rm_accuracy": rm["accuracy"]}
            proxy = score_pool(rm["export"], bon_pool, f"bon{seed}")
            g0, p0 = float(bon_gold.mean()), float(proxy.mean())
            for i, n in enumerate(c.bon_n):
                g, p = bon_estimate(proxy, bon_gold, n)
                kl = float(kl_bon(n))
                rows.append({**common, "method": "bon", "kl_coef": "", "point": i, "n": n, "kl": kl,
                             "d": math.sqrt(kl), "kl_pool": kl_bon_pool(proxy, n), "gold": g, "proxy": p,
                             "gold_delta": g - g0, "proxy_delta": BT_TEMPERATURE * (p - p0),
                             "samples": bon_gold.size})
            if base_pool is not None:
                bg0 = float(np.mean(base_pool["gold"]))
                bp0 = float(score_pool(rm["export"], base_pool, f"base{seed}").mean())
            for kl_coef in c.ppo_kl_coefs if n_pairs in (c.ppo_rm_pairs or c.rm_pairs) else ():
                res = ppo_run(wd, sft_path, rm, n_pairs, seed, float(kl_coef), c)
                rows.append({**common, "method": "ppo", "kl_coef": kl_coef, "point": 0, "steps": 0, "kl": 0.0,
                             "d": 0.0, "kl_pool": math.nan, "gold": bg0, "proxy": bp0, "gold_delta": 0.0, "proxy_delta": 0.0,
                             "samples": len(base_pool["gold"]) * len(base_pool["gold"][0])})
                for i, w in enumerate(windows(res["rollouts"], c.ppo_windows)):
                    rows.append({**common, "method": "ppo", "kl_coef": kl_coef, "point": i + 1,
                                 "steps": f"{w['steps'][0]}-{w['steps'][1]}", "kl": w["kl"],
                                 "d": math.sqrt(max(w["kl"], 0.0)), "kl_pool": math.nan, "gold": w["gold"], "proxy": w["proxy"],
                                 "gold_delta": w["gold"] - bg0, "proxy_delta": BT_TEMPERATURE * (w["proxy"] - bp0),
                                 "samples": w["samples"]})
            ab.write_csv(os.path.join(wd, "runs.csv"), rows, CSV_FIELDS)
    ab.write_csv(os.path.join(wd, "runs.csv"), rows, CSV_FIELDS)
    agg = ab.aggregate(rows, ("method", "rm_pairs", "kl_coef", "point"),
                       ("kl", "d", "kl_pool", "gold", "proxy", "gold_delta", "proxy_delta", "rm_accuracy"))
    fits = fit_all(rows, c)
    seconds = time.time() - t0
    md = markdown(agg, fits, rows, c, seconds)
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write(md + "\n")
    out = {"config": c.to_dict(), "seconds": seconds, "command": ab.command_line(), "fits": fits,
           "answers": answers(agg, fits, c),
           "cells": [{"method": k[0], "rm_pairs": k[1], "kl_coef": k[2], "point": k[3],
                      **{m: list(v[m]) for m in ("d", "kl_pool", "gold_delta", "proxy_delta", "gold", "proxy",
                                                 "rm_accuracy")}} for k, v in sorted(agg.items(), key=str)]}
    ab.write_json_atomic(os.path.join(wd, "results.json"), out)
    plot(agg, fits, c, os.path.join(wd, "results.png"))
    print(md + f"\n\n(total {seconds:.0f}s; {wd}/results.md, results.png, runs.csv)")
    return out


# ---------------------------------------------------------------------------------------------- summaries


def _curves(rows, method, n_pairs, kl_coef):
    """{seed: (d, gold_delta, proxy_delta)} of one curve, sorted by point."""
    out = {}
    for r in sorted((r for r in rows if r["method"] == method and r["rm_pairs"] == n_pairs
                     and (method == "bon" or float(r["kl_coef"]) == float(kl_coef))), key=lambda r: r["point"]):
        d, g, p = out.setdefault(int(r["seed"]), ([], [], []))
        d.append(float(r["d"]))
        g.append(float(r["gold_delta"]))
        p.append(float(r["proxy_delta"]))
    return out


def curve_keys(c):
    return [("bon", n, "") for n in c.rm_pairs] + [("ppo", n, float(k)) for k in c.ppo_kl_coefs for n in c.rm_pairs]


def fit_all(rows, c) -> list[dict]:
    """Per curve (method, RM size, KL coefficient): α, β fitted per seed, mean ± std, and the fitted peak."""
    out = []
    for method, n_pairs, kl_coef in curve_keys(c):
        per_seed = {}
        for seed, (d, g, _) in _curves(rows, method, n_pairs, kl_coef).items():
            a, b = (fit_bon if method == "bon" else fit_rl)(d, g)
            dstar, rstar = peak(method, a, b)
            per_seed[seed] = {"alpha": a, "beta": b, "d_peak": dstar, "gold_peak": rstar}
        if not per_seed:
            continue
        entry = {"method": method, "rm_pairs": n_pairs, "kl_coef": kl_coef, "seeds": per_seed}
        for k in ("alpha", "beta", "d_peak", "gold_peak"):
            entry[k] = list(ab.mean_std([v[k] for v in per_seed.values()]))
        out.append(entry)
    return out


def answers(agg, fits, c) -> dict:
    """From the measured means: per curve, does gold peak and fall (its mean at the last point below its maximum by
    more than the std of the last point), does the proxy keep rising (maximum at the last point), and the peak
    gold; across RM sizes, whether the peak gold and the fitted β order with the data size."""
    out = {}
    for method, n_pairs, kl_coef in curve_keys(c):
        pts = sorted(p for (m, n, k, p) in agg if m == method and n == n_pairs and (method == "bon" or k == kl_coef))
        if not pts:
            continue
        cell = lambda p: agg[(method, n_pairs, kl_coef if method == "ppo" else "", p)]  # noqa: E731
        gold = [cell(p)["gold_delta"] for p in pts]
        proxy = [cell(p)["proxy_delta"][0] for p in pts]
        gm = [g[0] for g in gold]
        i = int(np.argmax(gm))
        falls = i < len(pts) - 1 and gm[-1] < gm[i] - gold[-1][1]
        out[f"{method} n={n_pairs}" + (f" kl_coef={kl_coef:g}" if method == "ppo" else "")] = {
            "gold_peak_point": int(pts[i]), "gold_peak": gm[i], "gold_peak_d": cell(pts[i])["d"][0], "gold_last": gm[-1],
            "gold_falls_after_peak": bool(falls), "proxy_rises_to_last": bool(int(np.argmax(proxy)) == len(pts) - 1),
            "proxy_monotone": bool(all(b >= a for a, b in zip(proxy, proxy[1:])))}
    for method, kl_coef in [("bon", "")] + [("ppo", float(k)) for k in c.ppo_kl_coefs]:
        tag = "" if method == "bon" else f" kl_coef={kl_coef:g}"
        sizes = [n for n in c.rm_pairs if f"{method} n={n}{tag}" in out]
        if len(sizes) < 2:
            continue
        peaks = [out[f"{method} n={n}{tag}"]["gold_peak"] for n in sizes]
        out[f"{method}{tag} by RM size"] = {
            "rm_pairs": sizes, "gold_peak": peaks,
            "peak_increases_with_data": bool(all(b > a for a, b in zip(peaks, peaks[1:])))}
    return out


def _fmt(ms, digits=3):
    return ab.fmt(tuple(ms), digits)


def markdown(agg, fits, rows, c, seconds) -> str:
    lines = ["# Reward-model overoptimisation on the toy task (Gao, Schulman & Hilton 2023)", "",
             f"π_init: the shared SFT model (seed {FLAGS.seed}) sampled at temperature {c.temperature:g}. Proxies: "
             f"Bradley-Terry RMs from the SFT model on the first n ∈ {{{', '.join(map(str, c.rm_pairs))}}} toy "
             f"pairs ({c.rm_steps} steps x {c.rm_batch_size} pairs, lr {c.rm_learning_rate:g}). Gold: the toy "
             "task's programmatic reward (max 1.5). Δ = relative to π_init's samples; proxy Δ on the gold scale = "
             f"{BT_TEMPERATURE:g}·(r − r̄_init). d = √KL (nats). Mean ± sample std over seeds "
             f"{', '.join(map(str, c.seeds))} (seed = RM seed = pool seed = PPO seed). Wall time {seconds:.0f} s "
             "for this invocation (cached runs are read back, not rerun).", "",
             f"## Proxy reward models (held-out pair accuracy, {c.eval_pairs or 300} pairs)", "",
             "| pairs | accuracy |", "|---|---|"]
    for n in c.rm_pairs:
        k = next((k for k in agg if k[0] == "bon" and k[1] == n), None)
        if k:
            lines.append(f"| {n} | {_fmt(agg[k]['rm_accuracy'])} |")
    lines += ["", f"## Best-of-n ({c.bon_prompts} held-out prompts x a pool of {c.bon_pool} per seed; d from "
              "KL_bon = log n − (n−1)/n; kl_pool = KL over the pool's empirical distribution)", "",
              "| RM pairs | n | d | kl_pool | gold Δ | proxy Δ |", "|---|---|---|---|---|---|"]
    for n_pairs in c.rm_pairs:
        for i, n in enumerate(c.bon_n):
            v = agg.get(("bon", n_pairs, "", i))
            if v:
                lines.append(f"| {n_pairs} | {n} | {v['d'][0]:.3f} | {_fmt(v['kl_pool'])} | {_fmt(v['gold_delta'])} "
                             f"| {_fmt(v['proxy_delta'])} |")
    for k in c.ppo_kl_coefs:
        lines += ["", f"## PPO (KL coefficient {float(k):g}; {c.ppo_steps} steps, {c.ppo_batch_size} prompts per "
                  f"rollout, lr {c.ppo_learning_rate:g}; rollouts in {c.ppo_windows} windows; point 0 = π_init)", "",
                  "| RM pairs | window (steps) | d | gold Δ | proxy Δ |", "|---|---|---|---|---|"]
        for n_pairs in c.rm_pairs:
            for p in range(c.ppo_windows + 1):
                v = agg.get(("ppo", n_pairs, float(k), p))
                if v:
                    steps = next(iter(v["seeds"].values()))["steps"]
                    lines.append(f"| {n_pairs} | {steps} | {_fmt(v['d'])} | {_fmt(v['gold_delta'])} | "
                                 f"{_fmt(v['proxy_delta'])} |")
    lines += ["", "## Fitted functional forms (least squares per seed, no intercept; mean ± std over seeds)", "",
              "Best-of-n: gold Δ(d) = d(α − β·d), peak d* = α/2β. RL: gold Δ(d) = d(α − β·log d), peak "
              "d* = exp(α/β − 1). β ≤ 0: no peak (d* over the seeds that have one).", "",
              "| method | RM pairs | α | β | d* | gold Δ at d* |", "|---|---|---|---|---|---|"]
    for f in fits:
        name = "best-of-n" if f["method"] == "bon" else f"PPO (KL coef {f['kl_coef']:g})"
        peaks = [v for v in f["seeds"].values() if math.isfinite(v["d_peak"])]
        if len(peaks) == len(f["seeds"]):
            dp, gp = _fmt(f["d_peak"], 2), _fmt(f["gold_peak"])
        else:  # a seed with β <= 0 has no peak: the mean over the others, and how many
            dp = f"{_fmt(ab.mean_std([v['d_peak'] for v in peaks]), 2)} ({len(peaks)} of {len(f['seeds'])} seeds)" \
                if peaks else "none"
            gp = _fmt(ab.mean_std([v["gold_peak"] for v in peaks])) if peaks else "none"
        lines.append(f"| {name} | {f['rm_pairs']} | {_fmt(f['alpha'])} | {_fmt(f['beta'])} | {dp} | {gp} |")
    lines += ["", "## Answers (from the means above)", ""]
    for name, a in answers(agg, fits, c).items():
        if name.endswith("by RM size"):
            lines.append(f"- {name}: peak gold Δ " + ", ".join(f"{n} pairs {g:+.3f}" for n, g in
                                                             zip(a["rm_pairs"], a["gold_peak"]))
                         + (": increases with the RM's data" if a["peak_increases_with_data"] else
                            ": does not increase monotonically with the RM's data") + ".")
            continue
        lines.append(f"- {name}: gold Δ peaks at point {int(a['gold_peak_point'])} (d = {a['gold_peak_d']:.2f}, "
                     f"{a['gold_peak']:+.3f}) and ends at {a['gold_last']:+.3f}: "
                     + ("falls after the peak (by more than the last point's std)" if a["gold_falls_after_peak"]
                        else "does not fall (beyond the last point's std)")
                     + "; proxy " + ("rises to the last point" if a["proxy_rises_to_last"] else
                                     "does not rise to the last point")
                     + (" (monotone)" if a["proxy_monotone"] else "") + ".")
    return "\n".join(lines)


def plot(agg, fits, c, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("bon", "", "best-of-n (held-out prompts)")] + \
        [("ppo", float(k), f"PPO, KL coefficient {float(k):g} (training rollouts)") for k in c.ppo_kl_coefs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (method, k, title) in zip(axes[0], panels):
        for j, n_pairs in enumerate(c.rm_pairs):
            pts = sorted(p for (m, n, kk, p) in agg if m == method and n == n_pairs and kk == k)
            if not pts:
                continue
            v = [agg[(method, n_pairs, k, p)] for p in pts]
            d = np.array([x["d"][0] for x in v])
            dx = np.array([x["d"][1] for x in v])
            col = colors[j % len(colors)]
            acc = v[0]["rm_accuracy"][0]
            ax.errorbar(d, [x["gold_delta"][0] for x in v], yerr=[x["gold_delta"][1] for x in v],
                        xerr=dx if method == "ppo" else None, color=col, marker="o", ms=4, capsize=3,
                        label=f"gold, RM on {n_pairs} pairs (acc {acc:.2f})")
            ax.errorbar(d, [x["proxy_delta"][0] for x in v], yerr=[x["proxy_delta"][1] for x in v], color=col,
                        marker="^", ms=4, capsize=3, ls=":", alpha=0.8, label=f"proxy, RM on {n_pairs} pairs")
            f = next((f for f in fits if f["method"] == method and f["rm_pairs"] == n_pairs
                      and (method == "bon" or f["kl_coef"] == k)), None)
            if f:
                xs = np.linspace(0, max(d.max(), 1e-3) * 1.05, 100)
                ys = (bon_form if method == "bon" else rl_form)(xs, f["alpha"][0], f["beta"][0])
                ax.plot(xs, ys, color=col, ls="--", lw=1, alpha=0.7)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("d = √KL(π ‖ π_init)  (√nats)")
        ax.set_ylabel("reward − reward of π_init (gold units, max gold 1.5)")
        ax.set_title(title + "; dashed: fitted gold form", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reward-model overoptimisation on the toy task: gold (solid) vs proxy (dotted); error bars = ± std "
                 f"over {len(c.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry point


def config_from_flags():
    c = get_config(FLAGS.size)
    try:
        if FLAGS.rm_pairs:
            c.rm_pairs = tuple(int(x) for x in FLAGS.rm_pairs)
        if FLAGS.seeds:
            c.seeds = tuple(int(x) for x in FLAGS.seeds)
        if FLAGS.kl_coefs is not None:
            c.ppo_kl_coefs = tuple(float(x) for x in FLAGS.kl_coefs)
    except ValueError as e:
        raise UserError(f"--rm_pairs/--seeds/--kl_coefs: {e}") from None
    if any(n < 1 for n in c.rm_pairs):
        raise UserError(f"--rm_pairs must be positive, got {c.rm_pairs}")
    if any(k < 0 for k in c.ppo_kl_coefs):
        raise UserError(f"--kl_coefs must be >= 0, got {c.ppo_kl_coefs}")
    if FLAGS.ppo_steps:
        if FLAGS.ppo_steps % c.ppo_epochs:
            raise UserError(f"--ppo_steps must be a multiple of the {c.ppo_epochs} PPO epochs per rollout")
        c.ppo_steps = FLAGS.ppo_steps
    if FLAGS.sft_steps:
        c.sft_steps = FLAGS.sft_steps
    if max(c.bon_n) > c.bon_pool:
        raise UserError(f"best-of-n up to {max(c.bon_n)} needs a pool of at least that many (pool {c.bon_pool})")
    return c


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
