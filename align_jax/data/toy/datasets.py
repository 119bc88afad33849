"""Seeded generation of the toy-world JSONL files (conversational TRL-style records).

SFT noise: exactly ``round(noise_rate * n)`` examples are noisy; a noisy example draws a
family from ``NOISE_MIX`` and a prompt *focused* (prob. ``FOCUS``) on a sub-population, so the
noise is systematic rather than uniform -- on those sub-populations the majority SFT answer is
wrong, which a greedy-decoding SFT model reproduces and DPO can fix:

* ``leak``          secret requests in ``world.HARD_SECRETS`` answered with the secret;
* ``over_refusal``  look-alike benign facts refused;
* ``format``        "Put the answer in brackets." ignored (brackets are also rare, 10%, in clean data);
* ``wrong_answer``  wrong arithmetic / fact answers (spread uniformly).

Every noisy SFT completion has gold reward < ``scoring.MAX_GOLD``; every clean one = MAX_GOLD.

Soft labels: ``chosen_prob = sigmoid((gold_chosen - gold_rejected) / BT_TEMPERATURE)``
(Bradley-Terry on the gold reward gap; a 0.5 format-only gap gives 0.58, refuse-vs-leak 0.91).
Group ranks: ``rank_i = #{j : score_j > score_i}`` (0 = best, ties share a rank).
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from align_jax.data.toy import scoring, world

CLEAN_KINDS = {"math": 0.6, "fact": 0.2, "secret": 0.2}
CLEAN_FORMATS = {"plain": 0.45, "sentence": 0.45, "brackets": 0.1}
BALANCED_KINDS = {"math": 0.5, "fact": 0.25, "secret": 0.25}
UNIFORM_FORMATS = {f: 1.0 for f in world.FORMAT_NAMES}
NOISE_MIX = {"leak": 0.3, "over_refusal": 0.3, "format": 0.3, "wrong_answer": 0.1}
FOCUS = 0.85
NOISE_RATE = 0.35
GRADED_PAIR_FRACTION = 0.2
BT_TEMPERATURE = 1.5
GROUP_SIZE = 4
BENIGN_GROUP_MIX = {"ideal": 0.3, "wrong_answer": 0.2, "format": 0.2, "wrong_both": 0.1,
                    "over_refusal": 0.2}
SECRET_GROUP_MIX = {"ideal": 0.4, "leak": 0.4, "comply_wrong": 0.2}
FILES = ("sft", "pairs", "pairs_soft", "groups_ranked", "groups_scored", "prompts",
         "eval_prompts", "eval_pairs")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def clean_problem(rng, split="train") -> world.Problem:
    """A prompt from the (skewed) clean SFT distribution."""
    return world.sample_problem(rng, world.choice(rng, CLEAN_KINDS),
                                world.choice(rng, CLEAN_FORMATS), split)


def balanced_problem(rng, split="train") -> world.Problem:
    """Balanced prompts (eval / prompt-only / groups): uniform formats, half look-alike facts."""
    kind = world.choice(rng, BALANCED_KINDS)
    subset = "lookalike" if kind == "fact" and rng.random() < 0.5 else "any"
    return world.sample_problem(rng, kind, world.choice(rng, UNIFORM_FORMATS), split, subset)


def noisy_problem(rng, family: str, split="train") -> world.Problem:
    """A prompt from the sub-population that noise ``family`` focuses on (prob. FOCUS)."""
    focus = rng.random() < FOCUS
    fmt = world.choice(rng, CLEAN_FORMATS)
    if family == "leak":
        return world.sample_problem(rng, "secret", fmt, split, "hard" if focus else "any")
    if family == "over_refusal":
        if focus:
            return world.sample_problem(rng, "fact", fmt, split, "lookalike")
        return world.sample_problem(rng, world.choice(rng, {"math": 0.5, "fact": 0.5}), fmt, split)
    if family == "format":
        kind = world.choice(rng, {"math": 0.7, "fact": 0.3})
        return world.sample_problem(rng, kind, "brackets" if focus else fmt, split)
    if family == "wrong_answer":
        return world.sample_problem(rng, world.choice(rng, {"math": 0.8, "fact": 0.2}), fmt, split)
    raise ValueError(family)


def sft_records(rng, n: int, noise_rate: float = NOISE_RATE) -> list[dict]:
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.permutation(n)[: round(noise_rate * n)]] = True  # exactly round(rate*n) noisy
    out = []
    for is_noisy in noisy:
        if is_noisy:
            fam = world.choice(rng, NOISE_MIX)
            p = noisy_problem(rng, fam)
        else:
            fam, p = "ideal", clean_problem(rng)
        out.append({"messages": user(p.text) + assistant(world.respond(rng, p, fam))})
    return out


def bt_prob(gap: float) -> float:
    """Bradley-Terry probability that the response with the higher gold reward wins."""
    return 1.0 / (1.0 + math.exp(-gap / BT_TEMPERATURE))


def pair_records(rng, n: int, split="train") -> list[dict]:
    """Mostly ideal-vs-noise-family pairs on the noise-focused prompts; a fraction
    GRADED_PAIR_FRACTION are two random families on a balanced prompt (chosen may be imperfect)."""
    out = []
    while len(out) < n:
        if rng.random() < GRADED_PAIR_FRACTION:
            p = balanced_problem(rng, split)
            fams = world.SECRET_FAMILIES if p.kind == "secret" else world.BENIGN_FAMILIES
            i, j = rng.choice(len(fams), size=2, replace=False)
            a, b = world.respond(rng, p, fams[i]), world.respond(rng, p, fams[j])
        else:
            fam = world.choice(rng, NOISE_MIX)
            p = noisy_problem(rng, fam, split)
            a, b = world.respond(rng, p, "ideal"), world.respond(rng, p, fam)
        ga, gb = scoring.gold_reward(p.text, a), scoring.gold_reward(p.text, b)
        if ga == gb:
            continue
        (c, gc), (r, gr) = sorted([(a, ga), (b, gb)], key=lambda t: -t[1])
        out.append({"prompt": user(p.text), "chosen": assistant(c), "rejected": assistant(r),
                    "chosen_prob": bt_prob(gc - gr)})
    return out


def group_records(rng, n: int, split="train") -> list[dict]:
    """K=GROUP_SIZE responses per balanced prompt with gold ``scores`` and ``ranks``."""
    out = []
    while len(out) < n:
        p = balanced_problem(rng, split)
        mix = SECRET_GROUP_MIX if p.kind == "secret" else BENIGN_GROUP_MIX
        texts = [world.respond(rng, p, world.choice(rng, mix)) for _ in range(GROUP_SIZE)]
        scores = [scoring.gold_reward(p.text, t) for t in texts]
        if len(set(scores)) < 2:
            continue
        ranks = [sum(o > s for o in scores) for s in scores]
        out.append({"prompt": user(p.text), "responses": [assistant(t) for t in texts],
                    "ranks": ranks, "scores": scores})
    return out


def write_jsonl(path, records) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def generate(out_dir, *, seed: int = 0, n_sft: int = 4000, n_pairs: int = 2000,
             n_groups: int = 500, n_prompts: int = 1000, n_eval: int = 300,
             n_eval_pairs: int = 300, noise_rate: float = NOISE_RATE) -> dict[str, pathlib.Path]:
    """Write the toy-world files to ``out_dir``; returns {name: path} for ``FILES``.

    Deterministic in ``seed``; each file has its own stream (``default_rng([seed, i])``), so one
    file's size does not change another's content. Eval files use held-out operand pairs only.
    ``pairs_soft`` = ``pairs`` with ``chosen_prob``; ``groups_ranked``/``groups_scored`` hold
    the same groups with ``ranks`` / ``scores``.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = {name: np.random.default_rng([seed, i]) for i, name in enumerate(FILES)}
    pairs = pair_records(rng["pairs"], n_pairs)
    groups = group_records(rng["groups_ranked"], n_groups)
    records = {
        "sft": sft_records(rng["sft"], n_sft, noise_rate),
        "pairs": [{k: v for k, v in r.items() if k != "chosen_prob"} for r in pairs],
        "pairs_soft": pairs,
        "groups_ranked": [{k: v for k, v in g.items() if k != "scores"} for g in groups],
        "groups_scored": [{k: v for k, v in g.items() if k != "ranks"} for g in groups],
        "prompts": [{"prompt": user(balanced_problem(rng["prompts"]).text)} for _ in range(n_prompts)],
        "eval_prompts": [{"prompt": user(balanced_problem(rng["eval_prompts"], "eval").text)}
                         for _ in range(n_eval)],
        "eval_pairs": [{k: v for k, v in r.items() if k != "chosen_prob"}
                       for r in pair_records(rng["eval_pairs"], n_eval_pairs, "eval")],
    }
    paths = {}
    for name in FILES:
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], records[name])
    return paths
