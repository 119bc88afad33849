"""The reward–KL frontier on the toy task: gold reward vs KL(π‖π_SFT) for DPO, PPO (learned reward model and gold
reward), GRPO and ORPO over their KL / regularisation coefficients.

    python experiments/reward_kl_frontier.py --workdir=/tmp/align_jax_frontier            # default size (below)
    python experiments/reward_kl_frontier.py --workdir=/tmp/align_jax_frontier --size=full    # + GRPO, ORPO
    python experiments/reward_kl_frontier.py --workdir=/tmp/frontier_tiny --size=tiny     # the test's size
    python experiments/reward_kl_frontier.py --workdir=... --methods=DPO,PPO-gold --seeds=0,1,2,3 \\
        --values=DPO:0.03/0.1/0.3,PPO-gold:0.01/0.05/0.2
    python experiments/reward_kl_frontier.py --workdir=... --size=full --only_finished   # report what has run

Paper: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model" (NeurIPS 2023), Fig. 2 (left): on controlled sentiment generation (IMDb, GPT-2-large), the
expected reward against KL(π‖π_ref) for DPO, PPO with a learned reward model, PPO with the ground-truth reward
("PPO-GT"), and other baselines, each hyper-parameter setting a point. Claim: DPO attains the best frontier, its
reward/KL trade-off strictly dominating PPO's, even PPO's with access to the ground-truth reward.

Setting. The toy task of experiments/toy_pipeline.py. One shared SFT stage (`toy_pipeline.sft_stage`, 400 steps,
seed --seed = 0) and one reward model (configs/reward_model.py, 120 steps from the SFT export on the soft-label
pairs, as experiments/toy_rlhf.py). Per method x coefficient x seed, a run from the SFT export with the project's
`train(config, workdir)` on the method's config, its own budget:
  DPO       configs/dpo.py: 120 steps x 16 pairs, lr 1e-4 linear; β = loss.kwargs.beta ∈ {0.03, 0.1, 0.3}.
  PPO-RM    configs/ppo.py: 120 optimizer steps = 30 rollouts x 64 prompts x 4 PPO epochs, lr 1e-4, value model
            from the reward model, rewards from the reward model; kl_coef ∈ {0.05} ({0.01, 0.05, 0.2} at full).
  PPO-gold  the same, rewards = the toy task's gold reward (`rl.rewards.toy_gold`), kl_coef ∈ {0.05, 0.2}
            ({0.01, 0.05, 0.2} at full). align_jax's PPO takes only a reward-model export (`ppo.reward_model`),
            not a reward function: `oracle_scores` (this script) swaps the reward model's score in PPO's rollout
            pass for the gold reward of the decoded completion (a `jax.pure_callback`); all else is PPO as
            configured. The test checks that PPO-gold's logged rollout rewards equal the gold reward.
  GRPO      (--size=full) configs/grpo.py: 100 steps x 8 prompts x 8 completions, lr 3e-4, gold reward;
            β = loss.kwargs.beta ∈ {0, 0.04, 0.2}.
  ORPO      (--size=full) configs/orpo.py with DPO's budget (120 x 16, lr 1e-4 linear; the config's 8e-6 barely
            moves the toy model, see label_noise.py); λ = loss.kwargs.beta ∈ {0.05, 0.2, 1.0}.
PPO samples at temperature 1.0 here (configs/ppo.py: 0.7), so that it optimises the KL-regularised reward of the
same policy that is measured; GRPO samples at 1.0 already. Seeds 0, 1, 2 set each run's data order and sampling;
the SFT model and the reward model are shared, so ± std is the spread of the alignment stage only.

Measurement, the same for every method (`frontier_point`): on 100 held-out prompts (eval_prompts.jsonl, operand
pairs never trained on), 8 completions per prompt sampled from the trained policy at temperature 1 (up to 12
tokens, stopping after EOS; `align_jax.sampling.Sampler`); their sequence log-probs under the policy and under
the SFT model (`models.logps.completion_logps_jit`, the helper PPO's rollouts use) give
KL(π‖π_SFT) = E_{y~π}[Σ_t log π(y_t|x, y_<t) − log π_SFT(y_t|x, y_<t)] in nats per completion (`kl_estimate`;
the evaluation's log π of the samples equals the sampler's own to 1e-5, runs.csv `logp_check`), and their mean
gold reward (max 1.5) is the y axis, as the paper plots the reward of samples. The gold reward of greedy answers
to the same prompts (`evaluation.generate_completions`, as toy_pipeline.evaluate_policy; 24 tokens) is the right
panel. The SFT model is the point (0, its reward). The training-time KL metrics, which differ per algorithm, are
not used. The verdict (results.md) compares means over seeds: a point of another method lies above DPO's
frontier when its reward exceeds DPO's best reward at no more KL (the SFT start counting as a DPO point at KL 0).

Measured (the default command, 2026-11-30, quiet 2-core machine; all cells 3 seeds; results.md; mean ± std over
seeds; the ORPO row is a single extra run with --values from an earlier run, not part of the default grid):

    method     coefficient     n   KL(π‖π_SFT) [nats]   gold reward (samples)   gold reward (greedy)
    SFT        -                   0                    0.345                   0.435
    DPO        β = 0.03        3   1.006 ± 0.105        0.777 ± 0.027           1.008 ± 0.016
    DPO        β = 0.1         3   0.943 ± 0.156        0.789 ± 0.029           1.012 ± 0.010
    DPO        β = 0.3         3   0.749 ± 0.024        0.818 ± 0.025           1.018 ± 0.016
    PPO-gold   kl_coef = 0.05  3   0.568 ± 0.047        0.876 ± 0.054           1.023 ± 0.057
    PPO-gold   kl_coef = 0.2   3   0.387 ± 0.029        0.869 ± 0.043           1.037 ± 0.020
    PPO-RM     kl_coef = 0.05  3   0.596 ± 0.071        0.853 ± 0.026           1.028 ± 0.008
    ORPO       λ = 0.2         1   0.500                0.785                   1.050   (run with --values)

Verdict: the paper's claim does not hold on the toy task. PPO with the gold reward reaches at least DPO's gold
reward at about 75 % of DPO's lowest KL: at kl_coef = 0.05, KL 0.568 ± 0.047 vs DPO's best point (β = 0.3)
0.749 ± 0.024 nats, gold reward 0.876 ± 0.054 vs 0.818 ± 0.025 (the rewards' ± 1 std overlap; the KLs do not), so
it dominates every DPO point. PPO-gold at kl_coef = 0.2 (KL 0.387 ± 0.029, reward 0.869 ± 0.043) and PPO with the
learned reward model at 0.05 (KL 0.596 ± 0.071, reward 0.853 ± 0.026) also beat all three DPO points at no more KL,
and
so does ORPO at λ = 0.2 (KL 0.50, reward 0.79; one seed, DPO's budget; GRPO was not run). DPO's KL responds weakly to β at this
training length (1.01 -> 0.75 nats from β = 0.03 to 0.3, a 10x change), and larger β gives more reward, not
less: 120 steps of 16 pairs (0.96 epochs) stop DPO far from its optimum, so its points are where its training
stopped rather than its frontier; a converged comparison would need longer DPO runs (not done here). The same holds with greedy answers (right panel).

Time. The default command (9 DPO + 6 PPO-gold + 3 PPO-RM runs after the shared SFT and reward model, the cells in
one process per CPU) took 12 min 58 s end to end on this 2-core machine (2026-11-30; SFT ~80 s, reward model 58 s,
DPO cells ~25 s and PPO cells ~85 s each on one core). Reproducibility: against an earlier run of the same grid,
DPO's KLs agree to 1e-7 relative; PPO's moved within their seed spread (e.g. PPO-RM seed 1: 0.542 vs 0.594 nats),
since its sampled rollouts turn float-level differences of today's code changes into other tokens. `full` (45 runs)
took 742 s with the cells on both cores on top of the default's cached runs.

What differs from the paper. A 0.82 M-parameter Llama on a synthetic arithmetic / facts / secrets task with a
programmatic gold reward, not GPT-2-large on IMDb with a sentiment classifier; one training length per method (the
configs' own), each run one point at its end, not a sweep over checkpoints; 3 coefficients per method, not the
paper's grid; the paper's other baselines (Unlikelihood, Preferred-FT, Best-of-N) are not run; GRPO and ORPO are
this project's additions. The paper's exact sampling temperature for Fig. 2 and its KL estimator were not
available to check here; this script's choices are above.

Writes to --workdir: runs.csv (every run: KL, its standard error over samples, gold reward of samples and of greedy
answers, greedy correctness, completion length, fraction without EOS, seconds, CPU seconds), results.md (table:
mean ± sample std over seeds per method x coefficient, the SFT point, and the verdict), results.json (the same,
the config, the command, the seconds) and results.png (the frontier: gold reward vs KL, error bars = ± std over
seeds in both axes; left samples, right greedy). Each finished run (<workdir>/runs/<run>/result.json; checkpoints
then deleted, export kept) is skipped on rerun; an interrupted one resumes from its checkpoints; a rerun with other
settings in the same --workdir is refused.
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
import toy_pipeline as tp  # noqa: E402  (its flags: --workdir, --seed (SFT, RM), --sft_steps, --threads)

from align_jax.errors import UserError  # noqa: E402

flags.DEFINE_string("size", "", "'' (default size: DPO, PPO-RM, PPO-gold), 'full' (+ GRPO, ORPO, 3 coefficients "
                    "each) or 'tiny' (seconds, for tests).")
flags.DEFINE_list("methods", None, "Override the methods (DPO, ORPO, GRPO, PPO-RM, PPO-gold).")
flags.DEFINE_list("values", None, "Override sweep values per method: METHOD:v1/v2/...,METHOD:...")
flags.DEFINE_list("seeds", None, "Override the seeds of the aligned runs (the SFT stage and the reward model use "
                  "--seed).")
flags.DEFINE_integer("jobs", 0, "Run the grid's cells in this many processes, one CPU each (the same numbers as "
                     "1 job); 0 = one per CPU this process may use (2 on a 2-core machine about halves the time).")
flags.DEFINE_string("shard", "", "Internal (--jobs): compute only cells i, i+n, ... of the grid ('i/n').")
flags.DEFINE_bool("only_finished", False, "Train nothing: report the grid's finished runs (of an interrupted or "
                  "partial experiment); the table gives each cell's number of seeds.")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "/tmp/align_jax_frontier")

# method -> (config file, the swept knob (its name in the plot), how it is set)
METHODS = {
    "DPO": ("dpo", "β"),
    "ORPO": ("orpo", "λ"),
    "GRPO": ("grpo", "β"),
    "PPO-RM": ("ppo", "kl_coef"),  # rewards from the learned reward model (configs/reward_model.py)
    "PPO-gold": ("ppo", "kl_coef"),  # rewards = the toy task's gold reward (oracle; oracle_scores below)
}
EVAL_SALT = 1414  # issue 14, item 2: the evaluation samples' own stream
CSV_FIELDS = ["method", "value", "seed", "kl", "kl_sem", "gold_sample", "gold_greedy", "correctness_greedy",
              "mean_length", "no_eos", "logp_check", "train_seconds", "seconds", "cpu_seconds", "run"]
KEYS = ("kl", "gold_sample", "gold_greedy", "mean_length")


def get_config(arg: str = ""):
    """The experiment's config; `arg="full"`: all five methods x 3 coefficients; `arg="tiny"`: 2 methods x 2
    values x 2 seeds of a few steps (the test's size)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    # default: the paper's comparison (DPO against PPO with the learned and with the gold reward), PPO-RM at the
    # config's kl_coef only (each PPO run ~2 min on one core); `full`: every method x 3 coefficients
    c.methods = ("DPO", "PPO-RM", "PPO-gold")
    c.sweep = ml_collections.ConfigDict({
        "DPO": (0.03, 0.1, 0.3),  # loss.kwargs.beta (configs/dpo.py: 0.1)
        "PPO-RM": (0.05,),  # ppo.kl_coef (configs/ppo.py: 0.05)
        "PPO-gold": (0.05, 0.2),
    })
    full = ml_collections.ConfigDict({
        "DPO": (0.03, 0.1, 0.3),  # loss.kwargs.beta (configs/dpo.py: 0.1)
        "ORPO": (0.05, 0.2, 1.0),  # loss.kwargs.beta = λ (configs/orpo.py: 0.1)
        "GRPO": (0.0, 0.04, 0.2),  # loss.kwargs.beta (configs/grpo.py: 0.0, TRL's default; 0.04 DeepSeekMath's)
        "PPO-RM": (0.01, 0.05, 0.2),  # ppo.kl_coef (configs/ppo.py: 0.05)
        "PPO-gold": (0.01, 0.05, 0.2),
    })
    c.seeds = (0, 1, 2)
    # training budgets: each config's own length unless noted
    c.steps = ml_collections.ConfigDict({"DPO": 120, "ORPO": 120, "GRPO": 100, "PPO-RM": 120, "PPO-gold": 120})
    c.orpo_learning_rate = 1e-4  # configs/orpo.py's 8e-6 barely moves the toy model (label_noise.py's docstring)
    c.orpo_batch_size = 16  # = DPO's
    c.ppo_temperature = 1.0  # configs/ppo.py: 0.7; 1.0 = the policy whose KL and reward are measured
    c.sft_steps = 0  # 0 = configs/sft.py's default (400), the toy pipeline's SFT stage
    c.rm_steps = 120  # experiments/toy_rlhf.py's
    c.eval_prompts = 100  # held-out prompts (eval_prompts.jsonl)
    c.samples_per_prompt = 8  # temperature-1 samples per prompt for KL and the sample gold reward
    c.max_new_tokens = 12  # = ppo.response_length / grpo.max_completion_length (toy answers <= 7 tokens + EOS)
    c.greedy_max_new_tokens = 24  # toy_pipeline.evaluate_policy's
    if arg == "full":
        c.methods, c.sweep = ("DPO", "PPO-RM", "PPO-gold", "GRPO", "ORPO"), full
    elif arg == "tiny":
        c.methods = ("DPO", "PPO-gold")
        c.sweep = ml_collections.ConfigDict({"DPO": (0.1, 0.3), "PPO-gold": (0.05, 0.2)})
        c.seeds = (0, 1)
        c.steps = ml_collections.ConfigDict({"DPO": 2, "PPO-gold": 4})
        c.sft_steps = 2
        c.rm_steps = 2
        c.eval_prompts = 8
        c.samples_per_prompt = 2
    elif arg:
        raise UserError(f"unknown size {arg!r}; use '', 'full' or 'tiny'")
    return c


# ------------------------------------------------------------------------------------------ configs per run


def run_config(method: str, value: float, seed: int, wd: str, sft_path: str, rm_path: str, c):
    """configs/<dpo|orpo|grpo|ppo>.py with this experiment's overrides (no new trainer: `train(config, wd)`)."""
    name, _ = METHODS[method]
    cfg = ab.load_config(name, wd, seed)
    cfg.model.init_from = sft_path
    cfg.total_steps = int(c.steps[method])
    cfg.eval_every = 0
    cfg.eval_generation = 0  # evaluated after training, the same way for every method (frontier_point)
    cfg.progress_bar = False
    cfg.log_every = max(cfg.total_steps // 4, 1)
    cfg.checkpoint.every_steps = cfg.total_steps
    if name in ("dpo", "orpo"):
        cfg.data.eval = ""
        cfg.data.max_length = 64  # configs/dpo.py's: toy examples are ~20-45 tokens
        cfg.data.length_buckets = (32, 48, 64)
        cfg.loss.kwargs = {"beta": float(value), **({"label_smoothing": 0.0} if name == "dpo" else {})}
    if name == "orpo":
        cfg.optimizer.learning_rate = c.orpo_learning_rate
        cfg.optimizer.schedule = "linear"
        cfg.batch_size = c.orpo_batch_size
    if name == "grpo":
        cfg.loss.kwargs = {**dict(cfg.loss.kwargs), "beta": float(value)}
        cfg.loss.reference_free = False
    if name == "ppo":
        cfg.ppo.reward_model = rm_path
        cfg.ppo.kl_coef = float(value)
        cfg.ppo.temperature = c.ppo_temperature
        K = cfg.ppo.num_ppo_epochs * cfg.ppo.num_mini_batches
        if cfg.total_steps % K:
            raise UserError(f"{method}: steps {cfg.total_steps} must be a multiple of {K} (whole rollouts)")
    return cfg


# ---------------------------------------------------------------------------- PPO with the gold reward (oracle)


_ORACLE: dict = {}


class oracle_scores:
    """PPO with a reward *function*: configs/ppo.py / align_jax.algorithms.ppo take only a reward-model export
    (`ppo.reward_model`, scored in the jitted rollout pass by `heads.sequence_scores`). Inside this context the
    rollout pass scores each completion with the toy task's gold reward instead (`rl.rewards.toy_gold` through a
    `jax.pure_callback`, on the decoded completion and the rollout's prompt texts); everything else of PPO (value
    model from the reward model, KL penalty, GAE, clipping) is unchanged. Single process only."""

    def __init__(self, tokenizer_path: str, response_length: int):
        self.tok_path, self.N = tokenizer_path, response_length

    def __enter__(self):
        import jax
        import jax.numpy as jnp
        from transformers import AutoTokenizer

        from align_jax.algorithms import ppo
        from align_jax.rl.rewards import toy_gold

        if jax.process_count() > 1:
            raise UserError("PPO-gold (oracle_scores) runs in a single process only")
        # the host side reads the tokenizer, N and the rollout's prompts from _ORACLE at call time: the jitted
        # rollout pass (traced once per process) keeps the first callback it saw
        _ORACLE.update(tok=AutoTokenizer.from_pretrained(self.tok_path), N=self.N)

        def host(ids, attn):
            tok, N, prompts = _ORACLE["tok"], _ORACLE["N"], _ORACLE["prompts"]
            ids, attn = np.asarray(ids), np.asarray(attn)
            texts = [tok.decode([int(t) for t, m in zip(r[-N:], a[-N:]) if m and t != tok.eos_token_id],
                                skip_special_tokens=True) for r, a in zip(ids, attn)]
            if len(prompts) != len(texts):
                raise RuntimeError(f"oracle_scores: {len(prompts)} prompts for {len(texts)} completions")
            return np.asarray(toy_gold(prompts, texts), np.float32)

        def scores(rm, ids, attn):
            del rm
            return jax.pure_callback(host, jax.ShapeDtypeStruct((ids.shape[0],), jnp.float32), ids, attn)

        orig_rollout = ppo.PPORollout.rollout

        def rollout(obj, params, prompts, step):
            _ORACLE["prompts"] = list(prompts["prompt_text"])
            return orig_rollout(obj, params, prompts, step)

        self.saved = (ppo.sequence_scores, ppo.rollout_tensors, ppo.PPORollout.rollout)
        ppo.sequence_scores = scores
        # another jit of the same function (one per process, reused by every PPO-gold run): the traces cached by a
        # reward-model run must not be reused
        if "jit" not in _ORACLE:
            _ORACLE["jit"] = jax.jit(self.saved[1].__wrapped__,
                                     static_argnames=("pv_graphdef", "ref_graphdef", "rm_graphdef", "N", "kw"))
        ppo.rollout_tensors = _ORACLE["jit"]
        ppo.PPORollout.rollout = rollout
        return self

    def __exit__(self, *exc):
        from align_jax.algorithms import ppo

        ppo.sequence_scores, ppo.rollout_tensors, ppo.PPORollout.rollout = self.saved
        return False


# ------------------------------------------------------------------------------------- the frontier's point


def kl_estimate(logp_RxN, ref_logp_RxN, mask_RxN) -> tuple[float, float, np.ndarray]:
    """Sequence-level KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)] from samples y ~ π: per sample the sum
    over its completion tokens (mask) of the log-ratio; returns (mean, standard error of the mean, per sample)."""
    m = np.asarray(mask_RxN, np.float64)
    d = ((np.asarray(logp_RxN, np.float64) - np.asarray(ref_logp_RxN, np.float64)) * m).sum(1)
    sem = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), sem, d


_MODELS: dict = {}


def _load(path: str):
    from align_jax.models import load_pretrained

    if path not in _MODELS:
        _MODELS[path] = load_pretrained(path)
    return _MODELS[path]


def frontier_point(policy_path: str, ref_path: str, prompts: list, c, seed: int) -> dict:
    """The run's point: `samples_per_prompt` completions per held-out prompt sampled from the policy at temperature 1
    (`align_jax.sampling.Sampler`, up to `max_new_tokens`, stopping after EOS), their sequence log-probs under the
    policy and under the SFT model (`align_jax.models.logps.completion_logps_jit`, the rollouts' helper) ->
    KL (kl_estimate) and the samples' mean gold reward; plus the gold reward of greedy answers
    (`align_jax.evaluation.generate_completions`, as toy_pipeline.evaluate_policy)."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from align_jax.data.tokenize import tokenize_chat, tokenize_text
    from align_jax.data.toy import scoring
    from align_jax.evaluation import generate_completions
    from align_jax.models.logps import completion_logps_jit
    from align_jax.sampling import Sampler

    model, ref = _load(policy_path), _load(ref_path)
    tok = AutoTokenizer.from_pretrained(policy_path)
    ids = [tokenize_text(tok, p) if isinstance(p, str) else tokenize_chat(tok, p, add_generation_prompt=True)
           for p in prompts]
    P, N, G = max(len(x) for x in ids), int(c.max_new_tokens), int(c.samples_per_prompt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    arr, mask = np.full((len(ids), P), pad, np.int32), np.zeros((len(ids), P), np.int32)
    for i, x in enumerate(ids):
        arr[i, P - len(x):], mask[i, P - len(x):] = x, 1
    sampler = Sampler(max_new_tokens=N, temperature=1.0, eos_ids=(tok.eos_token_id,), pad_id=pad, num_generations=G)
    out = sampler(model, arr, mask, rng=jax.random.key(EVAL_SALT * 1000 + seed))
    comp, cmask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    full = np.concatenate([np.asarray(out.prompt_ids), comp], 1)
    attn = np.concatenate([np.asarray(out.prompt_mask), cmask], 1)
    lps = []
    for m in (model, ref):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        lps.append(np.asarray(completion_logps_jit(graphdef, params, rest, full, attn, num_completion_tokens=N,
                                                   temperature=1.0, chunk_size=8192)))
    kl, sem, _ = kl_estimate(lps[0], lps[1], cmask)
    # the sampler's own log-probs of its samples: the same numbers up to float error (a check of the set-up)
    check = float(np.abs((lps[0] - np.asarray(out.model_logps)) * cmask).max())
    eos = tok.eos_token_id
    texts = [tok.decode([int(t) for t, m in zip(r, mk) if m and t != eos], skip_special_tokens=True)
             for r, mk in zip(comp, cmask)]
    rep = [p for p in prompts for _ in range(G)]
    gold = scoring.gold_reward_func(rep, texts)
    no_eos = float(np.mean([not ((r == eos) & (mk > 0)).any() for r, mk in zip(comp, cmask)]))
    greedy = generate_completions(model, tok, prompts, batch_size=len(prompts), max_new_tokens=c.greedy_max_new_tokens)
    g = scoring.evaluate(prompts, greedy)
    return {"kl": kl, "kl_sem": sem, "gold_sample": float(np.mean(gold)), "gold_greedy": float(g["gold_reward"]),
            "correctness_greedy": float(g["correctness"]), "mean_length": float(cmask.sum(1).mean()),
            "no_eos": no_eos, "logp_check": check,
            "samples": [{"prompt": scoring.prompt_text(p), "completion": t, "gold": float(r)}
                        for p, t, r in list(zip(rep, texts, gold))[:4 * G:G]]}


# ------------------------------------------------------------------------------------------------------ runs


def _signature(method: str, cfg, c) -> dict:
    """What a finished run's numbers depend on besides its name (a rerun with other settings must not reuse them)."""
    sig = {"loss": cfg.loss.name, "loss_kwargs": dict(cfg.loss.kwargs), "steps": cfg.total_steps,
           "batch_size": cfg.batch_size, "learning_rate": cfg.optimizer.learning_rate, "sft_steps": c.sft_steps,
           "sft_seed": FLAGS.seed, "eval": [c.eval_prompts, c.samples_per_prompt, c.max_new_tokens,
                                            c.greedy_max_new_tokens]}
    if "ppo" in cfg:
        sig.update(kl_coef=cfg.ppo.kl_coef, temperature=cfg.ppo.temperature, rm_steps=c.rm_steps,
                   reward="gold" if method == "PPO-gold" else "reward_model")
    return sig


def run_name(method: str, value: float, seed: int) -> str:
    return f"{method}_{value:g}_seed{seed}"


def one_run(method: str, value: float, seed: int, wd: str, sft_path: str, rm_path: str, prompts, c) -> dict:
    """Trains and evaluates one cell, or reads its result.json when it is done (ab.cached_run)."""
    from align_jax.train import train

    rd = os.path.join(wd, "runs", run_name(method, value, seed))
    cfg = run_config(method, value, seed, wd, sft_path, rm_path, c)

    def compute():
        t0, c0 = time.time(), time.process_time()
        export = os.path.join(rd, "export")
        if not os.path.exists(os.path.join(export, "model.safetensors")):
            print(f"[{run_name(method, value, seed)}] training {cfg.algorithm} ({METHODS[method][1]} = {value:g}, "
                  f"{cfg.total_steps} steps)", flush=True)
            if method == "PPO-gold":
                with oracle_scores(sft_path, cfg.ppo.response_length):
                    train(cfg, rd)
            else:
                train(cfg, rd)
        t_train = time.time() - t0
        point = frontier_point(export, sft_path, prompts, c, seed)
        _MODELS.pop(export, None)
        res = {"run": run_name(method, value, seed), "method": method, "value": value, "seed": seed, **point,
               "train_seconds": t_train, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
        print(f"[{res['run']}] KL {res['kl']:.3f} nats, gold reward {res['gold_sample']:.3f} (samples), "
              f"{res['gold_greedy']:.3f} (greedy), {res['seconds']:.0f}s", flush=True)
        return res

    return ab.cached_run(rd, _signature(method, cfg, c), compute)


def reward_model_stage(wd: str, sft_path: str, c) -> str:
    """The reward model PPO-RM uses (and whose backbone is every PPO run's value model), trained once from the SFT
    export on the toy task's soft-label pairs, as experiments/toy_rlhf.py does."""
    rm = ab.load_config("reward_model", wd, FLAGS.seed)
    rm.model.init_from = sft_path
    rm.total_steps = c.rm_steps
    rm.eval_every = 0
    rm.progress_bar = False
    rm.checkpoint.every_steps = rm.total_steps
    return tp._stage("reward_model", rm, os.path.join(wd, "reward_model"))


# ------------------------------------------------------------------------------------------------ summaries


def aggregate(rows: list[dict], keys=KEYS) -> dict:
    """{(method, value): {key: (mean, sample std (ddof 1), n), "seeds": {seed: row}}}."""
    return ab.aggregate(rows, ("method", "value"), keys)


def frontier_reward(points: list[tuple[float, float]], kl: float) -> float:
    """The best reward a method reaches at KL <= `kl` (its Pareto frontier as a step function; -inf if none)."""
    return max([r for k, r in points if k <= kl], default=-np.inf)


def frontier_verdict(agg: dict, methods, key: str = "gold_sample", start=None) -> tuple[str, list[str]]:
    """Does DPO's frontier dominate each other method's? For every point q of another method (means over seeds):
    DPO's best reward at KL <= KL(q) against q's reward. 'DPO dominates' when no point of the other method lies above
    DPO's frontier; '<method> dominates' when every DPO point is beaten by the other's frontier at no more KL;
    else 'the frontiers cross'. `start` = (KL, reward) of the SFT model, a point of every method's frontier (any
    method stays there as its coefficient grows). Returns (verdict line, per-method lines)."""
    pts = {m: sorted((v["kl"][0], v[key][0]) for (mm, _), v in agg.items() if mm == m) for m in methods}
    std = {(m, v["kl"][0], v[key][0]): (v["kl"][1], v[key][1], v[key][2]) for (m, _), v in agg.items()}
    base = [tuple(start)] if start is not None else []

    def show(m, k, r):
        sk, sr, n = std.get((m, k, r), (0.0, 0.0, 1))
        return f"KL {k:.2f} ± {sk:.2f}: {r:.3f} ± {sr:.3f} (n = {n})" if n > 1 else f"KL {k:.2f}: {r:.3f} (n = 1)"

    if "DPO" not in pts or not pts["DPO"]:
        return "Not answered: no DPO runs.", []
    lines, verdicts = [], {}
    for m in methods:
        if m == "DPO" or not pts.get(m):
            continue
        above = [(k, r) for k, r in pts[m] if r > frontier_reward(pts["DPO"] + base, k)]
        beaten = [(k, r) for k, r in pts["DPO"] if r < frontier_reward(pts[m] + base, k)]
        if not above:
            v = "DPO dominates"
        elif len(beaten) == len(pts["DPO"]):
            v = f"{m} dominates"
        else:
            v = "the frontiers cross"
        verdicts[m] = v
        lines.append(f"- {m}: {v}. " + (f"{len(above)} of its {len(pts[m])} points lie above DPO's frontier ("
                     + ", ".join(f"{show(m, k, r)} vs DPO's {frontier_reward(pts['DPO'] + base, k):.3f}"
                                 .replace("-inf", "none at that KL") for k, r in above) + ")" if above else
                     f"none of its {len(pts[m])} points lies above DPO's frontier") +
                     f"; {len(beaten)} of DPO's {len(pts['DPO'])} points are beaten by its frontier at no more KL"
                     + (" (" + ", ".join(show("DPO", k, r) for k, r in beaten) + ")." if beaten else "."))
    if not verdicts:
        return "Not answered: DPO is the only method.", lines
    if all(v == "DPO dominates" for v in verdicts.values()):
        head = "Supported on the toy task: no point of any other method lies above DPO's reward–KL frontier."
    elif all(v == "DPO dominates" for m, v in verdicts.items() if m.startswith("PPO")) and any(
            m.startswith("PPO") for m in verdicts):
        head = ("Partly supported: DPO's frontier dominates PPO's (learned and gold reward), but not every other "
                "method's.")
    else:
        ppo_bad = [m for m, v in verdicts.items() if m.startswith("PPO") and v != "DPO dominates"]
        head = ("Not supported on the toy task: " + (", ".join(ppo_bad) + " reach" + ("es" if len(ppo_bad) == 1
                else "") + " more gold reward than DPO at some KL" if ppo_bad else
                "another method reaches more gold reward than DPO at some KL") + ".")
    return head, lines


def _cell(agg, m, v, key, digits=3, n_seeds=0) -> str:
    """'mean ± std' of a cell, '(n = k)' added when it has fewer seeds than the grid; '—' when it has none."""
    if (m, v) not in agg:
        return "—"
    n = agg[(m, v)][key][2]
    return ab.fmt(agg[(m, v)][key], digits) + (f" (n = {n})" if n < n_seeds else "")


def markdown(agg: dict, sft: dict, c, seconds: float, rm_acc) -> str:
    head, lines = frontier_verdict(agg, c.methods, start=(sft["kl"], sft["gold_sample"]))
    head_g, lines_g = frontier_verdict(agg, c.methods, "gold_greedy", start=(sft["kl"], sft["gold_greedy"]))
    out = ["# Reward–KL frontier on the toy task (DPO paper, Fig. 2 left)", "",
           f"Shared SFT start (seed {FLAGS.seed}) and reward model ({c.rm_steps} steps"
           + (f", held-out pair accuracy {rm_acc:.3f}" if rm_acc is not None else "") + "). Per run: the method's "
           f"config with its coefficient set, trained from the SFT export; then {c.samples_per_prompt} samples at "
           f"temperature 1 per held-out prompt ({c.eval_prompts} prompts, up to {c.max_new_tokens} tokens): "
           "KL(π‖π_SFT) = mean over samples of Σ_t log π(y_t|·) − log π_SFT(y_t|·) (nats per completion), and "
           "their mean gold reward; greedy gold reward on the same prompts. Mean ± sample std over seeds "
           f"{', '.join(map(str, c.seeds))}. Wall time {seconds:.0f} s for this invocation (finished runs are "
           "read back, not rerun).", "",
           "| method | coefficient | steps | KL(π‖π_SFT) [nats] | gold reward (samples, T = 1) | gold reward (greedy) "
           "| completion length [tokens] |", "|---|---|---|---|---|---|---|",
           f"| SFT | — | — | {sft['kl']:.3f} | {sft['gold_sample']:.3f} | {sft['gold_greedy']:.3f} | "
           f"{sft['mean_length']:.2f} |"]
    for m in c.methods:
        for v in c.sweep[m]:
            n = len(c.seeds)
            out.append(f"| {m} | {METHODS[m][1]} = {v:g} | {c.steps[m]} | {_cell(agg, m, float(v), 'kl', 3, n)} | "
                       f"{_cell(agg, m, float(v), 'gold_sample', 3, n)} | {_cell(agg, m, float(v), 'gold_greedy', 3, n)}"
                       f" | {_cell(agg, m, float(v), 'mean_length', 2, n)} |")
    out += ["", "## Does DPO attain the best reward–KL frontier?", "", f"**{head}**", "",
            "Gold reward of the temperature-1 samples (left panel), means over seeds; a method's frontier at KL k "
            "= its best mean reward at KL <= k, the SFT start (KL 0) included:", ""] + lines + \
           ["", f"With the greedy gold reward instead: {head_g}", ""] + lines_g + [""]
    return "\n".join(out)


COLORS = {"DPO": "tab:blue", "PPO-RM": "tab:orange", "PPO-gold": "tab:red", "GRPO": "tab:green", "ORPO": "tab:purple"}


def plot(agg: dict, sft: dict, c, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "gold_sample", "gold reward of temperature-1 samples"),
                           (axes[1], "gold_greedy", "gold reward of greedy answers")):
        for m in c.methods:
            cells = sorted(((float(v), agg[(m, float(v))]) for v in c.sweep[m] if (m, float(v)) in agg),
                           key=lambda t: t[1]["kl"][0])
            if not cells:
                continue
            x = [d["kl"][0] for _, d in cells]
            y = [d[key][0] for _, d in cells]
            ax.errorbar(x, y, xerr=[d["kl"][1] for _, d in cells], yerr=[d[key][1] for _, d in cells], marker="o",
                        ms=5, capsize=3, ls=":", lw=1, color=COLORS.get(m), label=f"{m} ({METHODS[m][1]})")
            for v, d in cells:
                ax.annotate(f"{v:g}", (d["kl"][0], d[key][0]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=COLORS.get(m))
        ax.plot([sft["kl"]], [sft[key]], "k*", ms=10, label="SFT (start)")
        ax.set_xlabel("KL(π ‖ π_SFT) per completion [nats] (temperature-1 samples, held-out prompts)")
        ax.set_ylabel(f"{label} (max 1.5)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_title("reward–KL frontier (as DPO paper Fig. 2 left)", fontsize=9)
    axes[1].set_title("the same runs, greedy answers", fontsize=9)
    ns = sorted({d["kl"][2] for d in agg.values()}) or [0]
    seeds = f"{ns[0]}" if ns[0] == ns[-1] else f"{ns[0]}-{ns[-1]} (per point: results.md)"
    fig.suptitle(f"Toy task, from a shared SFT model; error bars = ± std over {seeds} seeds (both axes); "
                 "labels = the coefficient", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def parse_values(items) -> dict[str, tuple[float, ...]]:
    """['DPO:0.1/0.3', 'GRPO:0'] -> {'DPO': (0.1, 0.3), 'GRPO': (0.0,)}."""
    out = {}
    for it in items or ():
        m, sep, vs = it.partition(":")
        if not sep or m not in METHODS or not vs:
            raise UserError(f"--values: {it!r} is not METHOD:v1/v2/... with METHOD in {list(METHODS)}")
        try:
            out[m] = tuple(float(v) for v in vs.split("/"))
        except ValueError:
            raise UserError(f"--values: {it!r} has a value that is not a number") from None
        if any(v < 0 for v in out[m]):
            raise UserError(f"--values: {it!r}: coefficients must be >= 0")
    return out


def config_from_flags():
    c = get_config(FLAGS.size)
    with c.unlocked():
        for m, vs in parse_values(FLAGS.values).items():
            c.sweep[m] = vs
            if m not in c.steps:
                c.steps[m] = get_config("").steps[m]
    if FLAGS.methods:
        unknown = [m for m in FLAGS.methods if m not in METHODS]
        if unknown:
            raise UserError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        missing = [m for m in FLAGS.methods if m not in c.sweep]
        if missing:
            raise UserError(f"--methods: {missing} have no values at this size; give them with --values")
        c.methods = tuple(FLAGS.methods)
    if FLAGS.seeds:
        c.seeds = tuple(int(s) for s in FLAGS.seeds)
    if FLAGS.sft_steps:
        c.sft_steps = FLAGS.sft_steps
    return c


def run(c, wd: str, only_finished: bool = False, jobs: int = 0) -> dict:
    from align_jax.data.toy import read_jsonl

    t0 = time.time()
    os.makedirs(wd, exist_ok=True)
    sft_path = tp.sft_stage(wd, c.sft_steps)
    needs_rm = any(m.startswith("PPO") for m in c.methods)
    rm_path = reward_model_stage(wd, sft_path, c) if needs_rm else ""
    rm_acc = None
    if needs_rm:
        _, rm_evals = tp.read_metrics(os.path.join(wd, "reward_model", "metrics.jsonl"))
        rm_acc = rm_evals[-1].get("eval/accuracy") if rm_evals else None
    prompts = [r["prompt"] for r in read_jsonl(os.path.join(wd, "toy_data", "eval_prompts.jsonl"))][:c.eval_prompts]
    sft_file = os.path.join(wd, f"sft_point_{c.eval_prompts}_{c.samples_per_prompt}_{c.max_new_tokens}.json")
    if os.path.exists(sft_file):
        with open(sft_file) as f:
            sft = json.load(f)
    else:
        sft = frontier_point(sft_path, sft_path, prompts, c, 0)
        ab.write_json_atomic(sft_file, sft)
    if jobs != 1 and not only_finished:
        ab.parallel_cells(jobs, wd)  # the grid's cells, cached: the loop below reads them
    results = []
    cells = [(seed, m, v) for seed in c.seeds for m in c.methods for v in c.sweep[m]]  # seed-major: an interrupted
    for k, (seed, m, v) in enumerate(cells):  # run already has every method for the first seeds
        if not ab.in_shard(k, FLAGS.shard):
            continue
        if only_finished and not os.path.exists(os.path.join(wd, "runs", run_name(m, float(v), int(seed)),
                                                             "result.json")):
            continue
        results.append(one_run(m, float(v), int(seed), wd, sft_path, rm_path, prompts, c))
        if not FLAGS.shard:
            ab.write_csv(os.path.join(wd, "runs.csv"), results, CSV_FIELDS)
    if FLAGS.shard:  # a child of --jobs: its cells are cached; the parent writes the report
        return {}
    agg = aggregate(results)
    seconds = time.time() - t0
    md = markdown(agg, sft, c, seconds, rm_acc)
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write(md + "\n")
    head, _ = frontier_verdict(agg, c.methods, start=(sft["kl"], sft["gold_sample"]))
    cells = [{"method": m, "value": v, **{k: list(d[k]) for k in KEYS}} for (m, v), d in sorted(agg.items())]
    ab.write_json_atomic(os.path.join(wd, "results.json"), {
        "config": c.to_dict(), "seconds": seconds, "command": ab.command_line(), "reward_model_accuracy": rm_acc,
        "sft": {k: v for k, v in sft.items() if k != "samples"}, "cells": cells, "verdict": head,
        "runs": len(results), "run_seconds_sum": sum(float(r["seconds"]) for r in results),
        "run_cpu_seconds_sum": sum(float(r.get("cpu_seconds") or 0.0) for r in results)})
    plot(agg, sft, c, os.path.join(wd, "results.png"))
    print(md + f"\n\n(total {seconds:.0f}s; {wd}/results.md, results.png, runs.csv)")
    return agg


def main(argv):
    del argv
    from align_jax import cli

    cli.pin_threads(FLAGS.threads)
    cli.console(cli.verbose_from_env())
    ab.use_compile_cache(FLAGS.workdir)
    cli.run(lambda: run(config_from_flags(), FLAGS.workdir, FLAGS.only_finished, FLAGS.jobs), cli.verbose_from_env())


if __name__ == "__main__":
    from absl import app

    app.run(main)
