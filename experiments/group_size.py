"""GRPO group size at a fixed sample budget, and pairwise vs groupwise preferences at an equal annotation budget.

    python experiments/group_size.py --workdir=/tmp/align_jax_group_size          # default size, ~11 min (see "Time")
    python experiments/group_size.py --workdir=/tmp/group_size_tiny --size=tiny   # the test's size
    python experiments/group_size.py --workdir=... --parts=grpo --group_sizes=2,4,8,16,32 --samples_per_step=64
    python experiments/group_size.py --workdir=... --parts=annotation --rank_steps=120 --seeds=0,1,2,3,4

Papers and claims. (a) GRPO: Shao et al. 2024, "DeepSeekMath" §4.1 (eq. 3): each question gets G completions from
the current policy, and a completion's advantage is its reward normalised by the mean and std of its group's G
rewards, the baseline that replaces PPO's value model (G = 64 in the paper's RL runs). The paper has no ablation
over G. Claim examined (the issue's item 7; the project's "ranking over groups: more expressive signal per step"):
at a fixed number of sampled completions, a larger group trains better, because its baseline is better and fewer
of its groups have all-equal rewards (a group whose G rewards are equal has zero advantage and gives no gradient),
traded against fewer distinct prompts per step. (b) Plackett–Luce vs pairwise: the DPO paper (Rafailov et al.
2023), Appendix A.3, derives DPO under the Plackett–Luce model over K ranked responses (listwise DPO,
`losses.listwise_dpo_loss`); LiPO (Liu et al. 2024) motivates listwise training by ranked lists "amortizing the
cost of reading the prompt" and reports its λ-weighted listwise loss (LiPO-λ, not in the library) ahead of pairwise
DPO. Claim examined: per annotation, a ranking of K responses is a more expressive signal than pairwise
comparisons, so at an equal annotation budget the groupwise learners (Plackett–Luce reward model, listwise DPO,
offline GRPO with rank advantages) beat the pairwise ones (Bradley–Terry reward model, DPO).

Annotation budget (part b), precisely. One annotation = one prompt's K = 4 responses, read once by the annotator
and labelled. The budget is the toy task's 500 ranked training groups (toy:groups_ranked: K = 4 responses of
mixed quality per prompt, ranks from the gold reward with ties, 0 = best; identical texts tie). The groupwise
arms train on the 500 rankings. Two pairwise data sets of the same budget are derived from them:
  * `*_all`: every pair the ranking implies (rank_i < rank_j: i ≻ j), 2271 pairs (4.5 per group; a ranking of 4
    without ties implies 6). Same annotations and the same information as the rankings (a pair is a consequence of
    the ranking); what differs is only the loss: Bradley–Terry on the implied pairs vs Plackett–Luce on the list.
  * `*_half`: the pairwise annotation of equal effort: the same 4 responses shown as K/2 = 2 disjoint pairwise
    comparisons (a random matching, drawn per seed from rng([1407, seed])), each labelled by the ranking; a tied
    pair (the annotator's "equal") is dropped: 747-756 pairs (1.5 per group). Each response is read once, as for
    the ranking.
Compute is equal too: every arm runs `rank_steps` steps of 32 sequences (8 groups x 4 responses, or 16 pairs x 2),
so in 60 steps PL sees the groups 0.96 times, BT/DPO_half its pairs 1.3 times, BT/DPO_all 42 % of its pairs once.

Setting. The toy task of experiments/toy_pipeline.py: one shared SFT stage (`toy_pipeline.sft_stage`, seed --seed,
400 steps from random init; gold reward 0.425 on the 200 held-out prompts used here), then every run starts from the SFT export
(the reference of DPO and listwise DPO = the SFT model; the reward models get a fresh scalar head on the SFT
backbone), with the library's `train(config, workdir)` on a configs/ file with overrides:
  (a) configs/grpo.py (online, rewards = the toy task's gold reward, loss dapo, β = 0, lr 3e-4 constant, 12 new
      tokens at temperature 1): G ∈ {2, 4, 8, 16} completions for each of 32 / G prompts per step (16, 8, 4, 2),
      40 steps: 1280 sampled completions for every G, the same number of optimizer steps.
  (b) reward models: configs/reward_model.py (PL: its :groupwise, `ranking` loss; BT: `reward` loss), lr 1e-4;
      policies: configs/dpo.py (DPO_all, DPO_half: dpo:sigmoid, β = 0.1, lr 1e-4 linear decay), the same config
      turned listwise (listwise_DPO: algorithm `listwise_dpo`, as configs/dpo.py:listwise, β = 0.1, lr 1e-4
      linear, padded batches) and configs/grpo.py:offline (GRPO_offline: `rank_advantages`, β = 0, lr 3e-4
      constant); 60 steps each.
The seed sets the run's data order, sampling and head initialisation, and the `*_half` matching; the SFT model and
the toy task are the same for every run, so the ± std is the spread of the second stage only.

Evaluation. Policies: gold reward of greedy answers to the first 200 of the toy task's 300 held-out prompts
(held-out operand pairs; max 1.5; `toy_pipeline.evaluate_policy`), and its log-likelihood accuracy on the 300
held-out pairs. Online GRPO also: the training reward (mean gold reward of each step's sampled completions; the
first and the last fifth of the steps) and the fraction of groups with all-equal rewards. Reward models: pairwise
accuracy (score(chosen) > score(rejected)) on the toy task's 300 held-out pairs (their distribution: pairs of an
ideal answer and a noisy one), and on all 892 pairs implied by 200 held-out groups drawn like the training groups
(`toy.datasets.group_records` on held-out operand pairs, rng([7014])), and top-1 accuracy on those groups (the
highest-scored response is a best-ranked one).

Measured at the default size (results.md; mean ± std over seeds 0-2; SFT start: gold reward 0.425 on these 200
prompts, log-likelihood pair accuracy 0.563):

    (a) online GRPO, 32 completions/step x 40 steps    gold reward       training reward, last steps   zero-std groups
        G = 2  (16 prompts/step)                        0.863 ± 0.178     0.663 ± 0.183                 0.68 ± 0.03
        G = 4  ( 8 prompts/step)                        0.983 ± 0.013     0.824 ± 0.010                 0.49 ± 0.03
        G = 8  ( 4 prompts/step)                        0.952 ± 0.033     0.715 ± 0.099                 0.30 ± 0.03
        G = 16 ( 2 prompts/step)                        0.961 ± 0.042     0.754 ± 0.146                 0.18 ± 0.04

    (b) reward models, 60 steps    toy held-out pairs   pairs of held-out groups   top-1 of held-out groups
        PL (500 rankings)          0.762 ± 0.013        0.782 ± 0.018              0.675 ± 0.022
        BT_all (2271 pairs)        0.768 ± 0.060        0.765 ± 0.008              0.635 ± 0.000
        BT_half (747-756 pairs)    0.777 ± 0.035        0.773 ± 0.005              0.642 ± 0.008
    (b) policies, 60 steps         gold reward
        listwise_DPO               0.952 ± 0.005
        DPO_all                    0.927 ± 0.021
        DPO_half                   0.907 ± 0.064
        GRPO_offline               0.512 ± 0.152

Verdicts. (a) "Larger G is better at a fixed sample budget": not supported beyond G = 4, inconclusive overall by
the ± 1 std rule. The mechanism is there: the fraction of groups with all-equal rewards (no gradient) falls from
0.68 at G = 2 to 0.18 at G = 16, and G = 2 is the worst and least stable setting (gold 0.863 ± 0.178; one seed at
0.660, the others 0.99 and 0.94). But G = 4, 8 and 16 are within each other's error bars (0.983 ± 0.013, 0.952 ±
0.033, 0.961 ± 0.042), and G = 4 has the best mean: past G = 4 the extra samples per prompt buy no more than the
prompts they replace on this task (whose prompts are easy for the SFT model: training reward 0.3-0.5 at the start).
(b) "A ranking is a more expressive signal per annotation than pairwise comparisons": inconclusive at this size,
with consistent small leads for the listwise learners. All 6 comparisons of the Plackett–Luce reward model and
listwise DPO with their pairwise counterparts are within ± 1 std; listwise DPO has the best mean gold reward and
the smallest spread (0.952 ± 0.005, above DPO_all in 3 of 3 seeds and DPO_half in 2 of 3), and the PL reward
model the best held-out group-pair and top-1 accuracies (above BT_all in 3 of 3 seeds), but on the toy task's own
held-out pairs BT_half is as good (0.777 ± 0.035 vs PL 0.762 ± 0.013). Equal annotation effort (`*_half`, 1/3 of
the implied pairs) costs little here: the reward models are far from converged after 60 steps (PL loss 1.6 of a
log 24 = 3.2 start), so data is not what limits them. Offline GRPO on the same rankings is clearly worse than
every DPO arm (0.512 ± 0.152, lower beyond ± 1 std in 3 of 3 seeds): with configs/grpo.py:offline's β = 0 and lr
3e-4 it has no reference to hold it and its answers lose correctness (0.158 vs 0.36-0.39 for the DPO arms).

Time. 33 runs after the SFT stage: the default command took 10 min 49 s end to end on one core of this 2-core
machine (2026-11-30; the other core ran tests), reproducing the earlier run's numbers (listwise DPO now through
the library's `listwise_dpo` algorithm: the same gold rewards). `--parts=grpo` (12 runs) or
`--parts=annotation` (21 runs) run one half. `--size=tiny`: G ∈ {2, 4} at 8 samples/step, the PL
and BT_half reward models and listwise DPO, 2 steps each on the first 40 groups, 2 seeds, SFT 2 steps, 8
held-out prompts, 32 held-out pairs, 16 held-out groups (numbers meaningless; the test's size).

What differs from the papers. DeepSeekMath's GRPO runs use G = 64 on a 7B model with a KL term (β = 0.04) and a
large prompt set; here a 0.82 M-parameter model, β = 0 (TRL 1.x's default), 40 steps (1280 samples), 12-token
answers and a gold reward in [-1, 1.5]; "fixed sample budget" counts sampled completions, so each step has the
same cost for every G. The rankings are the toy task's gold rankings (noise-free, with many ties: 4.5 implied pairs
per group of 4 instead of 6); LiPO's best loss (λ-weighted, LiPO-λ) is not in the library and not run; listwise
DPO is the DPO paper's A.3 Plackett–Luce objective. Offline GRPO (rank advantages on fixed groups) is this
library's variant, not a published method. The ± std is over the second stage's seed (one shared SFT model).

Outputs in --workdir: runs.csv (every run: gold reward and the toy task's axes, log-likelihood pair accuracy, the
reward models' three accuracies, training rewards, zero-std groups, samples or pairs trained on, final loss,
seconds), curves.csv (the training reward of every step of every GRPO run), results.md (the tables, mean ± sample
std, and the verdicts), results.json (config, numbers, verdicts, command, seconds) and results.png ((a) training
reward vs step, gold reward vs G; (b) reward-model accuracies, policy gold rewards; error bars and bands = ± std
over seeds). Each finished run (<workdir>/runs/<run>/result.json; checkpoints then deleted, export kept) is read
back on a rerun (`ablation.cached_run`); an interrupted one resumes from its checkpoints; a rerun with other
settings in the same --workdir is refused. The derived training files are in <workdir>/data/.
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
import toy_pipeline as tp  # noqa: E402  (its flags: --workdir, --seed (SFT), --sft_steps, --eval_prompts, --threads)

from align_jax.errors import UserError  # noqa: E402

flags.DEFINE_string("size", "", "'' (default size) or 'tiny' (seconds, for tests).")
flags.DEFINE_list("parts", None, "Override the sub-experiments: grpo (group size), annotation (pairwise vs groupwise).")
flags.DEFINE_list("group_sizes", None, "Override the online GRPO group sizes G (each must divide --samples_per_step).")
flags.DEFINE_integer("samples_per_step", 0, "Override the completions per GRPO step (prompts per step x G).")
flags.DEFINE_integer("grpo_steps", 0, "Override the online GRPO steps (0 = the size's default).")
flags.DEFINE_integer("rank_steps", 0, "Override the steps of the ranked-group runs (0 = the size's default).")
flags.DEFINE_list("rm_methods", None, "Override the reward-model arms (PL, BT_all, BT_half).")
flags.DEFINE_list("policy_methods", None, "Override the policy arms (listwise_DPO, DPO_all, DPO_half, GRPO_offline).")
flags.DEFINE_list("seeds", None, "Override the seeds of the runs (init of the head, data order, sampling, the "
                  "pairing of BT_half/DPO_half); the SFT stage's seed is --seed.")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "/tmp/align_jax_group_size")

PARTS = ("grpo", "annotation")
# arm -> (what it trains on, label)
RM_METHODS = {"PL": ("groups", "Plackett–Luce RM on the ranked groups"),
              "BT_all": ("pairs_all", "Bradley–Terry RM on all pairs implied by the rankings"),
              "BT_half": ("pairs_half", "Bradley–Terry RM on K/2 disjoint pairs per group")}
POLICY_METHODS = {"listwise_DPO": ("groups", "listwise (Plackett–Luce) DPO on the ranked groups"),
                  "DPO_all": ("pairs_all", "DPO on all pairs implied by the rankings"),
                  "DPO_half": ("pairs_half", "DPO on K/2 disjoint pairs per group"),
                  "GRPO_offline": ("groups", "offline GRPO on the ranked groups (rank advantages)")}
PAIRING_SALT = 1407  # issue 14, item 7: the stream of the K/2 random pairing, apart from any other use of the seed
EVAL_GROUP_SALT = 7014  # the held-out groups' stream
SMOOTH = 5  # steps averaged in the plotted training-reward curves
CSV_FIELDS = ["part", "method", "group_size", "prompts_per_step", "seed", "gold_reward", "correctness",
              "instruction_following", "safety", "over_refusal", "preference_accuracy", "rm_pair_accuracy",
              "rm_group_pair_accuracy", "rm_top1_accuracy", "train_reward_first", "train_reward_last",
              "frac_reward_zero_std", "train_examples", "train_pairs", "final_loss", "seconds", "run"]


def get_config(arg: str = ""):
    """The experiment's config; `arg="tiny"`: every arm at a few steps (the test's size)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.parts = PARTS
    c.seeds = (0, 1, 2)
    c.sft_steps = 0  # 0 = configs/sft.py's default (400), the toy pipeline's SFT stage
    c.eval_prompts = 200  # held-out prompts answered greedily (of the toy task's 300)
    # (a) online GRPO (configs/grpo.py) at a fixed sample budget: prompts per step = samples_per_step / G
    c.group_sizes = (2, 4, 8, 16)
    c.samples_per_step = 32
    c.grpo_steps = 40
    c.grpo_learning_rate = 3e-4  # configs/grpo.py's (constant)
    # (b) one annotation budget: the toy task's ranked groups (K = 4 responses per prompt, ties allowed)
    c.rm_methods = ("PL", "BT_all", "BT_half")
    c.policy_methods = ("listwise_DPO", "DPO_all", "DPO_half", "GRPO_offline")
    c.train_groups = 0  # 0 = all 500 training groups; n = the first n
    c.rank_steps = 60
    c.groups_per_step = 8  # groupwise arms: 8 groups x 4 responses; pairwise arms: 16 pairs (= 32 sequences too)
    c.rm_learning_rate = 1e-4  # configs/reward_model.py's
    c.dpo_learning_rate = 1e-4  # configs/dpo.py's (linear decay); also listwise DPO's
    c.dpo_beta = 0.1
    c.offline_learning_rate = 3e-4  # configs/grpo.py:offline's (constant)
    c.eval_pairs = 0  # 0 = the toy task's 300 held-out pairs; n = the first n
    c.eval_groups = 200  # held-out ranked groups (held-out operand pairs) for the reward models
    if arg == "tiny":
        c.seeds = (0, 1)
        c.sft_steps = 2
        c.eval_prompts = 8
        c.group_sizes = (2, 4)
        c.samples_per_step = 8
        c.grpo_steps = 2
        c.rm_methods = ("PL", "BT_half")
        c.policy_methods = ("listwise_DPO",)
        c.train_groups = 40
        c.rank_steps = 2
        c.groups_per_step = 4
        c.eval_pairs = 32
        c.eval_groups = 16
    elif arg:
        raise UserError(f"unknown size {arg!r}; use '' or 'tiny'")
    return c


# ------------------------------------------------------------------------------------ pairs from ranked groups


def _pair(group: dict, i: int, j: int) -> dict:
    """The pair (response i ≻ response j) of a group, as a pairwise record."""
    return {"prompt": group["prompt"], "chosen": group["responses"][i], "rejected": group["responses"][j]}


def all_pairs(group: dict) -> list[dict]:
    """Every pair (i ≻ j) the group's ranking implies: rank_i < rank_j (0 = best); tied responses give none. For a
    ranking without ties of K responses, K(K−1)/2 pairs."""
    r = group["ranks"]
    return [_pair(group, i, j) for i in range(len(r)) for j in range(len(r)) if r[i] < r[j]]


def half_pairs(group: dict, rng) -> list[dict]:
    """K/2 disjoint pairwise comparisons of the group's K responses (a random perfect matching drawn from `rng`;
    K odd: one response left out), each labelled by the ranking; a tied pair (the annotator's "equal") is
    dropped. Every response is shown once, as in the ranking: the pairwise annotation of equal effort."""
    r = group["ranks"]
    perm = rng.permutation(len(r))
    out = []
    for a, b in zip(perm[0::2], perm[1::2]):
        a, b = int(a), int(b)
        if r[a] != r[b]:
            out.append(_pair(group, a, b) if r[a] < r[b] else _pair(group, b, a))
    return out


def derived_pairs(groups: list[dict], how: str, seed: int) -> list[dict]:
    """The pairwise data set of the same annotations: `how` = "pairs_all" (all implied pairs) or "pairs_half"
    (K/2 disjoint pairs per group, drawn from rng([PAIRING_SALT, seed]))."""
    if how == "pairs_all":
        return [p for g in groups for p in all_pairs(g)]
    if how == "pairs_half":
        rng = np.random.default_rng([PAIRING_SALT, seed])
        return [p for g in groups for p in half_pairs(g, rng)]
    raise ValueError(how)


def training_files(wd: str, seed: int, c) -> dict:
    """Writes (once) <wd>/data/: groups.jsonl (the first `train_groups` of toy:groups_ranked), pairs_all.jsonl and
    pairs_half_seed<s>.jsonl. Returns {"groups" | "pairs_all" | "pairs_half": (path, number of records)}."""
    from align_jax.data.toy import read_jsonl

    out = os.path.join(wd, "data")
    os.makedirs(out, exist_ok=True)
    groups = read_jsonl(os.path.join(wd, "toy_data", "groups_ranked.jsonl"))
    if c.train_groups:
        groups = groups[:c.train_groups]
    files = {}
    for name, recs in (("groups", lambda: groups), ("pairs_all", lambda: derived_pairs(groups, "pairs_all", seed)),
                       (f"pairs_half_seed{seed}", lambda: derived_pairs(groups, "pairs_half", seed))):
        path = os.path.join(out, f"{name}.jsonl")
        if not os.path.exists(path):
            ab.write_jsonl_atomic(path, recs())
        with open(path) as f:
            n = sum(1 for _ in f)
        files[name.split("_seed")[0]] = (path, n)
    return files


def heldout_group_pairs(wd: str, n: int) -> tuple[str, dict]:
    """<wd>/data/eval_group_pairs_<n>.jsonl: every pair implied by `n` held-out ranked groups, drawn like the toy
    task's training groups (`toy.datasets.group_records`, held-out operand pairs) from rng([EVAL_GROUP_SALT]); and
    per pair its group and the ranks of its chosen and rejected responses ({"group", "chosen_rank",
    "rejected_rank"}: lists in file order, also written to <file>.meta.json)."""
    from align_jax.data.toy.datasets import group_records

    path = os.path.join(wd, "data", f"eval_group_pairs_{n}.jsonl")
    if not os.path.exists(path + ".meta.json"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        groups = group_records(np.random.default_rng([EVAL_GROUP_SALT]), n, split="eval")
        pairs, meta = [], {"group": [], "chosen_rank": [], "rejected_rank": []}
        for gi, g in enumerate(groups):
            r = g["ranks"]
            for i in range(len(r)):
                for j in range(len(r)):
                    if r[i] < r[j]:
                        pairs.append(_pair(g, i, j))
                        meta["group"].append(gi)
                        meta["chosen_rank"].append(r[i])
                        meta["rejected_rank"].append(r[j])
        ab.write_jsonl_atomic(path, pairs)
        ab.write_json_atomic(path + ".meta.json", meta)
    with open(path + ".meta.json") as f:
        return path, json.load(f)


# ------------------------------------------------------------------------------------------------- configs


def _base(name: str, arg: str, seed: int, wd: str, sft_path: str, steps: int):
    from align_jax.cli import load_config_file

    cfg = load_config_file(os.path.join(HERE, "..", "configs", f"{name}.py") + (f":{arg}" if arg else ""))
    cfg.seed = seed
    cfg.model.init_from = sft_path
    cfg.data.toy_dir, cfg.data.data_dir = os.path.join(wd, "toy_data"), os.path.join(wd, "tfds")
    cfg.data.eval = ""
    cfg.total_steps = steps
    cfg.checkpoint.every_steps = steps // 2 if steps >= 10 else steps  # one mid-way checkpoint to resume from
    cfg.eval_every = 0
    cfg.eval_generation = 0
    cfg.progress_bar = False
    cfg.log_every = max(steps // 4, 1)
    return cfg


def grpo_config(G: int, seed: int, wd: str, sft_path: str, c):
    """configs/grpo.py (online, gold reward of the toy task) with G completions for each of samples_per_step / G
    prompts per step."""
    if c.samples_per_step % G:
        raise UserError(f"group size {G} does not divide samples_per_step={c.samples_per_step}")
    cfg = _base("grpo", "", seed, wd, sft_path, c.grpo_steps)
    cfg.grpo.num_generations = G
    cfg.batch_size = c.samples_per_step // G
    cfg.optimizer.learning_rate = c.grpo_learning_rate
    cfg.grpo.log_completions_every = 10 ** 6
    return cfg


def ranked_config(method: str, seed: int, wd: str, sft_path: str, train_file: str, c):
    """The run of one arm of part (b) on `train_file` (groups or derived pairs): configs/reward_model.py (PL:
    its :groupwise), configs/dpo.py, configs/grpo.py:offline, or configs/dpo.py turned listwise."""
    steps, gps = c.rank_steps, c.groups_per_step
    groupwise = dict(RM_METHODS, **POLICY_METHODS)[method][0] == "groups"
    if method in RM_METHODS:
        cfg = _base("reward_model", "groupwise" if groupwise else "", seed, wd, sft_path, steps)
        cfg.optimizer.learning_rate = c.rm_learning_rate
    elif method == "GRPO_offline":
        cfg = _base("grpo", "offline", seed, wd, sft_path, steps)
        cfg.optimizer.learning_rate = c.offline_learning_rate
    else:
        cfg = _base("dpo", "", seed, wd, sft_path, steps)
        cfg.loss.kwargs = {"beta": c.dpo_beta} if groupwise else {"beta": c.dpo_beta, "label_smoothing": 0.0}
        cfg.optimizer.learning_rate = c.dpo_learning_rate
        if groupwise:  # configs/dpo.py:listwise
            cfg.algorithm = cfg.loss.name = "listwise_dpo"
            cfg.reference.precompute = False  # a live reference: listwise DPO has no precomputed path
            cfg.data.packing = False  # the README's runs were padded (packing gives the same loss to ~1e-6)
    cfg.data.train = train_file
    if groupwise:
        cfg.data.kind, cfg.data.group_size, cfg.batch_size = "groupwise", 4, gps
        cfg.data.max_prompt_length = 0
    else:
        cfg.batch_size = 2 * gps  # the same sequences per step as the groupwise arms (K = 4)
    cfg.data.max_length = 64
    cfg.data.length_buckets = (32, 48, 64)
    return cfg


# --------------------------------------------------------------------------------------------- evaluation


def eval_dir(wd: str, c) -> str:
    """The toy directory `toy_pipeline.evaluate_policy` reads: <wd>/toy_data, or with `c.eval_pairs` a copy holding
    the first eval_pairs held-out pairs (the tiny size)."""
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


def pair_scores(rm, tok, pairs_file: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Reward-model scores (chosen, rejected) of every pair of a pairwise file, in file order."""
    from align_jax.data import build_dataset, make_loader
    from align_jax.evaluation.policy import pair_reward_scores

    builder, _ = build_dataset(pairs_file, kind="pairwise", data_dir=data_dir)
    loader, _ = make_loader(builder.as_data_source("train"), tok, kind="pairwise", batch_size=100, shuffle=False,
                            num_epochs=1, drop_remainder=False, max_length=128, length_buckets=(64, 128))
    return pair_reward_scores(rm, loader)


def top1_accuracy(chosen, rejected, meta: dict) -> float:
    """The fraction of held-out groups whose highest-scored response is a best-ranked one (strictly above every
    response ranked below the best), from the scores of all the pairs a group implies: each response of a group
    with >= 2 distinct ranks is in some pair, the best-ranked ones as chosen with chosen_rank 0, every other one
    as rejected."""
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    group, best = np.asarray(meta["group"]), np.asarray(meta["chosen_rank"]) == 0
    ok = [chosen[(group == g) & best].max() > rejected[group == g].max() for g in np.unique(group)]
    return float(np.mean(ok)) if ok else float("nan")


def rm_accuracies(export: str, wd: str, c) -> dict:
    """Held-out accuracy of a reward model: on the toy task's held-out pairs and on the pairs of held-out groups."""
    from align_jax.rl.reward_model import load_reward_model
    from transformers import AutoTokenizer

    rm, tok = load_reward_model(export), AutoTokenizer.from_pretrained(export)
    data_dir = os.path.join(wd, "tfds")
    ch, rj = pair_scores(rm, tok, os.path.join(eval_dir(wd, c), "eval_pairs.jsonl"), data_dir)
    gfile, meta = heldout_group_pairs(wd, c.eval_groups)
    gch, grj = pair_scores(rm, tok, gfile, data_dir)
    return {"rm_pair_accuracy": float(np.mean(ch > rj)), "rm_group_pair_accuracy": float(np.mean(gch > grj)),
            "rm_top1_accuracy": top1_accuracy(gch, grj, meta)}


def policy_scores(export: str, wd: str, c) -> dict:
    s = tp.evaluate_policy(export, eval_dir(wd, c), c.eval_prompts, os.path.join(wd, "tfds"))
    return {k: s[k] for k in ("gold_reward", "correctness", "instruction_following", "safety", "over_refusal",
                              "preference_accuracy")}


# ----------------------------------------------------------------------------------------------------- runs


def _train(cfg, rd: str) -> None:
    from align_jax.train import train

    if not os.path.exists(os.path.join(rd, "export", "config.json")):
        print(f"[{os.path.basename(rd)}] training {cfg.algorithm} {cfg.loss.name} on {cfg.data.train}", flush=True)
        train(cfg, rd)


def _signature(cfg, c, extra: dict) -> dict:
    return {"algorithm": cfg.algorithm, "loss": cfg.loss.name, "loss_kwargs": dict(cfg.loss.kwargs),
            "steps": cfg.total_steps, "batch_size": cfg.batch_size, "learning_rate": cfg.optimizer.learning_rate,
            "sft_steps": c.sft_steps, "sft_seed": FLAGS.seed, "eval_prompts": c.eval_prompts,
            "eval_pairs": c.eval_pairs, **extra}


def grpo_run(G: int, seed: int, wd: str, sft_path: str, c) -> dict:
    name = f"grpo_G{G}_seed{seed}"
    rd = os.path.join(wd, "runs", name)
    cfg = grpo_config(G, seed, wd, sft_path, c)

    def compute():
        t0 = time.time()
        _train(cfg, rd)
        rows, _ = tp.read_metrics(os.path.join(rd, "metrics.jsonl"))
        curve = [float(r["reward"]) for r in rows]
        k = max(len(curve) // 5, 1)
        return {"run": name, "part": "grpo", "method": "GRPO", "group_size": G, "prompts_per_step": cfg.batch_size,
                "seed": seed, **policy_scores(os.path.join(rd, "export"), wd, c), "reward_curve": curve,
                "train_reward_first": float(np.mean(curve[:k])), "train_reward_last": float(np.mean(curve[-k:])),
                "frac_reward_zero_std": float(np.mean([float(r.get("frac_reward_zero_std", np.nan)) for r in rows])),
                "train_examples": cfg.batch_size * cfg.total_steps, "final_loss": _final_loss(rows),
                "seconds": time.time() - t0}

    res = ab.cached_run(rd, _signature(cfg, c, {"G": G, "samples_per_step": c.samples_per_step}), compute)
    print(f"[{name}] gold reward {res['gold_reward']:.3f}, training reward {res['train_reward_first']:.3f} -> "
          f"{res['train_reward_last']:.3f} ({res['seconds']:.0f}s)", flush=True)
    return res


def ranked_run(method: str, seed: int, wd: str, sft_path: str, c) -> dict:
    name = f"{method}_seed{seed}"
    rd = os.path.join(wd, "runs", name)
    files = training_files(wd, seed, c)
    what = dict(RM_METHODS, **POLICY_METHODS)[method][0]
    train_file, n = files[what]
    cfg = ranked_config(method, seed, wd, sft_path, train_file, c)

    def compute():
        t0 = time.time()
        _train(cfg, rd)
        rows, _ = tp.read_metrics(os.path.join(rd, "metrics.jsonl"))
        export = os.path.join(rd, "export")
        scores = rm_accuracies(export, wd, c) if method in RM_METHODS else policy_scores(export, wd, c)
        return {"run": name, "part": "rm" if method in RM_METHODS else "policy", "method": method, "seed": seed,
                **scores, "train_examples": files["groups"][1],
                "train_pairs": n if what != "groups" else files["pairs_all"][1],
                "final_loss": _final_loss(rows), "seconds": time.time() - t0}

    res = ab.cached_run(rd, _signature(cfg, c, {"train_groups": c.train_groups, "eval_groups": c.eval_groups,
                                                "train_records": n}), compute)
    key = "rm_pair_accuracy" if method in RM_METHODS else "gold_reward"
    print(f"[{name}] {key} {res[key]:.3f} ({res['seconds']:.0f}s)", flush=True)
    return res


def _final_loss(rows) -> float:
    losses = [float(r["loss"]) for r in rows][-10:]
    return float(np.mean(losses)) if losses else float("nan")


# ------------------------------------------------------------------------------------------------ summaries

GRPO_KEYS = ("gold_reward", "train_reward_first", "train_reward_last", "frac_reward_zero_std", "preference_accuracy")
RM_KEYS = ("rm_pair_accuracy", "rm_group_pair_accuracy", "rm_top1_accuracy")
POLICY_KEYS = ("gold_reward", "preference_accuracy", "correctness", "over_refusal")


def separated(a: tuple, b: tuple) -> str:
    """'higher' / 'lower' when a's ± 1 std interval lies above / below b's (no overlap), else 'indistinguishable'."""
    (m1, s1, _), (m2, s2, _) = a, b
    if m1 - s1 > m2 + s2:
        return "higher"
    if m1 + s1 < m2 - s2:
        return "lower"
    return "indistinguishable"


def seeds_higher(agg: dict, a, b, key: str) -> tuple[int, int]:
    """(seeds where cell a's `key` > cell b's, seeds both have)."""
    sa, sb = agg[a]["seeds"], agg[b]["seeds"]
    common = sorted(set(sa) & set(sb))
    return sum(float(sa[s][key]) > float(sb[s][key]) for s in common), len(common)


def grpo_verdict(agg: dict) -> str:
    """Answer to "at a fixed sample budget, is a larger group better?" from the final gold reward per G."""
    gs = sorted(int(g) for (g,) in agg)
    if len(gs) < 2:
        return "Not answered: a single group size."
    means = [agg[(g,)]["gold_reward"][0] for g in gs]
    n = min(agg[(g,)]["gold_reward"][2] for g in gs)
    lo, hi = (gs[0],), (gs[-1],)
    cmp = separated(agg[hi]["gold_reward"], agg[lo]["gold_reward"])
    k, m = seeds_higher(agg, hi, lo, "gold_reward")
    best = gs[int(np.argmax(means))]
    mono = all(b >= a for a, b in zip(means, means[1:]))
    anti = all(b <= a for a, b in zip(means, means[1:]))
    if n < 2:
        verdict = "Inconclusive: a single seed gives no error bar."
    elif mono and cmp == "higher":
        verdict = f"Supported: the gold reward rises with G, G = {gs[-1]} above G = {gs[0]} beyond ± 1 std."
    elif anti and cmp == "lower":
        verdict = f"Not supported: the gold reward falls with G, G = {gs[-1]} below G = {gs[0]} beyond ± 1 std."
    elif cmp == "higher":
        verdict = (f"Partly supported: G = {gs[-1]} is above G = {gs[0]} beyond ± 1 std, but the gold reward is not "
                   f"monotone in G (best G = {best}).")
    elif cmp == "lower":
        verdict = (f"Not supported: G = {gs[-1]} is below G = {gs[0]} beyond ± 1 std (best G = {best}; not "
                   f"monotone).")
    else:
        verdict = (f"Inconclusive at this size: G = {gs[-1]} and G = {gs[0]} are within each other's ± 1 std "
                   f"(best mean at G = {best}).")
    line = ", ".join(f"G = {g}: {ab.fmt(agg[(g,)]['gold_reward'])}" for g in gs)
    return (f"**At a fixed sample budget, is a larger group better? {verdict}** Gold reward: {line}; G = {gs[-1]} "
            f"above G = {gs[0]} in {k} of {m} seeds.")


def pair_verdicts(rm: dict, pol: dict) -> list[str]:
    """The groupwise-vs-pairwise comparisons at an equal annotation budget, each with its verdict."""
    out = []
    for agg, key, what, g, pairs in ((rm, "rm_pair_accuracy", "reward model, held-out pair accuracy", "PL",
                                      ("BT_half", "BT_all")),
                                     (rm, "rm_group_pair_accuracy", "reward model, held-out group-pair accuracy",
                                      "PL", ("BT_half", "BT_all")),
                                     (pol, "gold_reward", "policy, gold reward", "listwise_DPO",
                                      ("DPO_half", "DPO_all")),
                                     (pol, "gold_reward", "policy, gold reward", "GRPO_offline",
                                      ("DPO_half", "DPO_all"))):
        if (g,) not in agg:
            continue
        for p in pairs:
            if (p,) not in agg:
                continue
            cmp = separated(agg[(g,)][key], agg[(p,)][key])
            k, m = seeds_higher(agg, (g,), (p,), key)
            out.append(f"- {what}: {g} {ab.fmt(agg[(g,)][key])} vs {p} {ab.fmt(agg[(p,)][key])}: {g} is **{cmp}** "
                       f"(± 1 std; higher in {k} of {m} seeds).")
    return out


def smooth(curves: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` steps (fewer at the start) of each row of [runs, steps]."""
    c = np.cumsum(np.pad(curves, ((0, 0), (1, 0))), axis=1)
    idx = np.arange(1, curves.shape[1] + 1)
    lo = np.maximum(idx - window, 0)
    return (c[:, idx] - c[:, lo]) / (idx - lo)


def annotation_verdict(lines: list[str]) -> str:
    """One sentence over the groupwise-vs-pairwise comparisons of listwise DPO and the PL reward model (offline
    GRPO, a different objective, is reported apart)."""
    core = [x for x in lines if "GRPO_offline" not in x]
    if not core:
        return "Not answered: no groupwise/pairwise pair of arms in this run."
    higher = sum("**higher**" in x for x in core)
    lower = sum("**lower**" in x for x in core)
    if higher and not lower:
        return f"Supported in {higher} of {len(core)} comparisons (± 1 std), the others indistinguishable."
    if lower and not higher:
        return f"Not supported: the groupwise arm is lower in {lower} of {len(core)} comparisons (± 1 std)."
    if higher and lower:
        return f"Mixed: higher in {higher}, lower in {lower} of {len(core)} comparisons (± 1 std)."
    return (f"Inconclusive at this size: all {len(core)} comparisons of the PL reward model and listwise DPO with "
            "their pairwise counterparts are within ± 1 std.")


def _table(agg: dict, keys, labels, first: str, names: dict | None = None, order=None) -> list[str]:
    lines = [f"| {first} | " + " | ".join(labels) + " |", "|---|" + "---|" * len(keys)]
    for cell in (order or sorted(agg)):
        if cell not in agg:
            continue
        label = f"{cell[0]} ({names[cell[0]][1]})" if names else f"{cell[0]:g}"
        lines.append(f"| {label} | " + " | ".join(ab.fmt(agg[cell][k]) for k in keys) + " |")
    return lines


def markdown(grpo: dict, rm: dict, pol: dict, sft: dict, c, seconds: float, budget: dict) -> str:
    seeds = ", ".join(map(str, c.seeds))
    lines = ["# Group size and groupwise vs pairwise preferences on the toy task", "",
             f"Shared SFT start (seed {FLAGS.seed}), SFT gold reward {sft['gold_reward']:.3f} on {c.eval_prompts} "
             f"held-out prompts (greedy). Mean ± sample std (ddof 1) over seeds {seeds}. Wall time {seconds:.0f} s "
             "for this invocation (runs finished earlier are read back, not rerun).", ""]
    if grpo:
        lines += ["## (a) Online GRPO: group size G at a fixed sample budget", "",
                  f"{c.samples_per_step} completions per step = (prompts per step) x G, {c.grpo_steps} steps "
                  f"({c.samples_per_step * c.grpo_steps} completions) for every G; configs/grpo.py otherwise (gold "
                  f"reward of the toy task, lr {c.grpo_learning_rate:g} constant, β = 0, loss dapo). Training "
                  "reward = mean gold reward of the step's sampled completions (first / last fifth of the steps); "
                  "zero-std groups = fraction of groups whose G rewards are all equal (no gradient).", ""]
        lines += _table(grpo, GRPO_KEYS, ["gold reward (held-out, greedy)", "training reward, first steps",
                                          "training reward, last steps", "zero-std groups",
                                          "log-likelihood pair accuracy"], "G")
        lines += ["", grpo_verdict(grpo), ""]
    if rm or pol:
        lines += ["## (b) Pairwise vs groupwise at an equal annotation budget", "",
                  f"The budget: {budget['groups']} ranked groups of K = 4 responses (toy:groups_ranked; ranks with "
                  f"ties). Groupwise arms train on the rankings; BT_all / DPO_all on all {budget['pairs_all']} "
                  f"pairs the rankings imply (same annotations, same information); BT_half / DPO_half on K/2 = 2 "
                  f"disjoint comparisons per group (each response shown once, as in the ranking; ties dropped: "
                  f"{budget['pairs_half']} pairs for seed {c.seeds[0]}). Every arm: {c.rank_steps} steps of "
                  f"{4 * c.groups_per_step} sequences ({c.groups_per_step} groups or {2 * c.groups_per_step} "
                  "pairs).", ""]
        if rm:
            lines += ["### Reward models (from the SFT model; lr %g)" % c.rm_learning_rate, ""]
            lines += _table(rm, RM_KEYS, ["toy held-out pairs accuracy", "held-out group pairs accuracy",
                                          "held-out group top-1"], "arm", RM_METHODS,
                            [(m,) for m in RM_METHODS])
            lines.append("")
        if pol:
            lines += [f"### Policies (from the SFT model; DPO and listwise DPO lr {c.dpo_learning_rate:g} linear, "
                      f"β = {c.dpo_beta:g}; offline GRPO lr {c.offline_learning_rate:g} constant, β = 0)", ""]
            lines += _table(pol, POLICY_KEYS, ["gold reward", "log-likelihood pair accuracy", "correctness",
                                               "over-refusal"], "arm", POLICY_METHODS,
                            [(m,) for m in POLICY_METHODS])
            lines += ["", f"SFT start: gold reward {sft['gold_reward']:.3f}, log-likelihood pair accuracy "
                          f"{sft['preference_accuracy']:.3f}.", ""]
        verdicts = pair_verdicts(rm, pol)
        lines += [f"**Does a ranking carry more signal per annotation than pairwise comparisons? "
                  f"{annotation_verdict(verdicts)}**", ""]
        lines += verdicts + [""]
    return "\n".join(lines)


def plot(grpo: dict, curves: dict, rm: dict, pol: dict, sft: dict, c, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    for G in sorted(curves):
        arr = smooth(np.array(curves[G], dtype=np.float64), SMOOTH)  # [seeds, steps]
        steps = np.arange(1, arr.shape[1] + 1)
        m = arr.mean(0)
        s = arr.std(0, ddof=1) if arr.shape[0] > 1 else np.zeros_like(m)
        line, = ax.plot(steps, m, label=f"G = {G} ({c.samples_per_step // G} prompts/step)")
        ax.fill_between(steps, m - s, m + s, color=line.get_color(), alpha=0.15)
    ax.set_xlabel(f"optimizer step ({c.samples_per_step} sampled completions each)")
    ax.set_ylabel("training reward (mean gold reward of the samples)")
    ax.set_title(f"(a) online GRPO: training reward (mean of the last {SMOOTH} steps), band = ± std over seeds",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0, 1]
    if grpo:
        gs = sorted(int(g) for (g,) in grpo)
        ax.errorbar(gs, [grpo[(g,)]["gold_reward"][0] for g in gs], yerr=[grpo[(g,)]["gold_reward"][1] for g in gs],
                    marker="o", capsize=4, label=f"GRPO, {c.grpo_steps} steps x {c.samples_per_step} samples")
        ax.set_xscale("log", base=2)
        ax.set_xticks(gs, [str(g) for g in gs])
    ax.axhline(sft["gold_reward"], color="gray", ls="--", lw=1, label="SFT start")
    ax.set_xlabel("group size G (completions per prompt; prompts per step = budget / G)")
    ax.set_ylabel("gold reward, held-out prompts (greedy; max 1.5)")
    ax.set_title("(a) after training, at a fixed sample budget; error bars = ± std over seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1, 0]
    arms = [m for m in RM_METHODS if (m,) in rm]
    x = np.arange(len(arms))
    for i, (key, label) in enumerate((("rm_pair_accuracy", "toy held-out pairs"),
                                      ("rm_group_pair_accuracy", "pairs of held-out groups"),
                                      ("rm_top1_accuracy", "top-1 of held-out groups"))):
        ax.bar(x + (i - 1) * 0.27, [rm[(m,)][key][0] for m in arms], width=0.27,
               yerr=[rm[(m,)][key][1] for m in arms], capsize=3, label=label)
    ax.set_xticks(x, arms)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("accuracy (fraction)")
    ax.set_title("(b) reward models at one annotation budget (PL: rankings; BT: pairs from them)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1, 1]
    arms = [m for m in POLICY_METHODS if (m,) in pol]
    ax.bar(np.arange(len(arms)), [pol[(m,)]["gold_reward"][0] for m in arms],
           yerr=[pol[(m,)]["gold_reward"][1] for m in arms], capsize=4, color="tab:green", label="trained policy")
    ax.axhline(sft["gold_reward"], color="gray", ls="--", lw=1, label="SFT start")
    ax.set_xticks(np.arange(len(arms)), [m.replace("_", "\n") for m in arms])
    ax.set_ylabel("gold reward, held-out prompts (greedy; max 1.5)")
    ax.set_title(f"(b) policies on the same ranked groups, {c.rank_steps} steps; error bars = ± std", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"GRPO group size and groupwise vs pairwise preferences on the toy task ({len(c.seeds)} seeds)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[dict], sft: dict, c, wd: str, seconds: float) -> dict:
    """results.md, results.json, results.png and curves.csv from the runs."""
    grpo_rows = [r for r in results if r["part"] == "grpo"]
    rm_rows = [r for r in results if r["part"] == "rm"]
    pol_rows = [r for r in results if r["part"] == "policy"]
    grpo = ab.aggregate(grpo_rows, ("group_size",), GRPO_KEYS) if grpo_rows else {}
    rm = ab.aggregate(rm_rows, ("method",), RM_KEYS) if rm_rows else {}
    pol = ab.aggregate(pol_rows, ("method",), POLICY_KEYS) if pol_rows else {}
    curves: dict = {}
    for r in grpo_rows:
        curves.setdefault(int(r["group_size"]), []).append(r["reward_curve"])
    ab.write_csv(os.path.join(wd, "curves.csv"),
                 [{"group_size": r["group_size"], "seed": r["seed"], "step": i + 1, "train_reward": v}
                  for r in grpo_rows for i, v in enumerate(r["reward_curve"])],
                 ["group_size", "seed", "step", "train_reward"])
    budget = {"groups": 0, "pairs_all": 0, "pairs_half": 0}
    if rm_rows or pol_rows:
        files = training_files(wd, c.seeds[0], c)
        budget = {k: v[1] for k, v in files.items()}
    md = markdown(grpo, rm, pol, sft, c, seconds, budget)
    with open(os.path.join(wd, "results.md"), "w") as f:
        f.write(md + "\n")

    def cells(agg, keys):
        return [{"cell": k[0], **{key: list(v[key]) for key in keys}} for k, v in sorted(agg.items())]

    out = {"config": c.to_dict(), "seconds": seconds, "command": ab.command_line(), "budget": budget,
           "sft": {k: v for k, v in sft.items() if k != "samples"},
           "group_size": cells(grpo, GRPO_KEYS), "reward_models": cells(rm, RM_KEYS),
           "policies": cells(pol, POLICY_KEYS),
           "verdicts": {"group_size": grpo_verdict(grpo) if grpo else "",
                        "annotation": annotation_verdict(pair_verdicts(rm, pol)) if rm or pol else "",
                        "comparisons": pair_verdicts(rm, pol)}}
    ab.write_json_atomic(os.path.join(wd, "results.json"), out)
    plot(grpo, curves, rm, pol, sft, c, os.path.join(wd, "results.png"))
    print(md + f"\n\n(total {seconds:.0f}s; {wd}/results.md, results.png, runs.csv)")
    return out


# ------------------------------------------------------------------------------------------------------ main


def config_from_flags():
    c = get_config(FLAGS.size)
    if FLAGS.parts:
        bad = [p for p in FLAGS.parts if p not in PARTS]
        if bad:
            raise UserError(f"--parts: unknown {bad}; choose from {list(PARTS)}")
        c.parts = tuple(FLAGS.parts)
    for flag, known in (("rm_methods", RM_METHODS), ("policy_methods", POLICY_METHODS)):
        if FLAGS[flag].value:
            bad = [m for m in FLAGS[flag].value if m not in known]
            if bad:
                raise UserError(f"--{flag}: unknown {bad}; choose from {list(known)}")
            c[flag] = tuple(FLAGS[flag].value)
    if FLAGS.group_sizes:
        try:
            c.group_sizes = tuple(int(g) for g in FLAGS.group_sizes)
        except ValueError:
            raise UserError(f"--group_sizes: integers expected, got {FLAGS.group_sizes}") from None
    c.samples_per_step = FLAGS.samples_per_step or c.samples_per_step
    for G in c.group_sizes:
        if G < 2 or c.samples_per_step % G:
            raise UserError(f"--group_sizes: {G} must be >= 2 and divide samples_per_step={c.samples_per_step}")
    if FLAGS.seeds:
        c.seeds = tuple(int(s) for s in FLAGS.seeds)
    c.grpo_steps = FLAGS.grpo_steps or c.grpo_steps
    c.rank_steps = FLAGS.rank_steps or c.rank_steps
    if FLAGS.sft_steps:
        c.sft_steps = FLAGS.sft_steps
    if FLAGS["eval_prompts"].present:
        c.eval_prompts = FLAGS.eval_prompts
    return c


def run(c, wd: str) -> dict:
    t0 = time.time()
    os.makedirs(wd, exist_ok=True)
    sft_path = tp.sft_stage(wd, c.sft_steps)
    sft_file = os.path.join(wd, f"sft_eval_{c.eval_prompts}_{c.eval_pairs}.json")
    if os.path.exists(sft_file):
        with open(sft_file) as f:
            sft = json.load(f)
    else:
        sft = policy_scores(sft_path, wd, c)
        ab.write_json_atomic(sft_file, sft)
    results = []
    for seed in c.seeds:  # seed-major: an interrupted default run has every arm for the first seeds
        if "grpo" in c.parts:
            for G in c.group_sizes:
                results.append(grpo_run(G, seed, wd, sft_path, c))
                ab.write_csv(os.path.join(wd, "runs.csv"), results, CSV_FIELDS)
        if "annotation" in c.parts:
            for m in tuple(c.rm_methods) + tuple(c.policy_methods):
                results.append(ranked_run(m, seed, wd, sft_path, c))
                ab.write_csv(os.path.join(wd, "runs.csv"), results, CSV_FIELDS)
    seconds = time.time() - t0
    return report(results, sft, c, wd, seconds)


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
