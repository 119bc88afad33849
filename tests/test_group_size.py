"""experiments/group_size.py at --size=tiny end to end (outputs exist and parse, the grid is complete, the pairs
derived from the ranked groups are the rankings' own, a rerun trains nothing) and its pure helpers on hand-made
inputs (pairs from a ranking, top-1, verdicts). Listwise DPO itself: tests/test_listwise_dpo.py."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT, load_experiment

# the tiny size
SEEDS, GS, BUDGET, STEPS = (0, 1), (2, 4), 8, 2
RMS, POLICIES, N_GROUPS = ("PL", "BT_half"), ("listwise_DPO",), 40




@pytest.fixture(scope="module")
def gs():
    return load_experiment("group_size")


def _run(wd):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))  # one CPU device
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "group_size.py"), f"--workdir={wd}",
                        "--size=tiny"], capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    wd = tmp_path_factory.mktemp("group_size")
    log = _run(wd)
    with open(wd / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return wd, rows, log


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _cell_values(md_section: str, label_start: str):
    line = next(x for x in md_section.splitlines() if x.startswith(f"| {label_start}"))
    return [tuple(float(v) for v in c.split("±")) for c in line.strip("|").split("|")[1:]]


def test_outputs_exist_parse_and_the_grid_is_complete(out, gs):
    wd, rows, _ = out
    for name in ("runs.csv", "results.md", "results.json", "results.png", "curves.csv"):
        assert (wd / name).stat().st_size > 0, name
    assert list(rows[0]) == gs.CSV_FIELDS
    grpo = [r for r in rows if r["part"] == "grpo"]
    assert sorted((int(r["group_size"]), int(r["seed"])) for r in grpo) == sorted((g, s) for g in GS for s in SEEDS)
    assert sorted((r["method"], int(r["seed"])) for r in rows if r["part"] == "rm") == \
        sorted((m, s) for m in RMS for s in SEEDS)
    assert sorted((r["method"], int(r["seed"])) for r in rows if r["part"] == "policy") == \
        sorted((m, s) for m in POLICIES for s in SEEDS)
    for r in rows:
        assert math.isfinite(float(r["final_loss"])) and float(r["seconds"]) > 0, r
        if r["part"] == "rm":
            for k in ("rm_pair_accuracy", "rm_group_pair_accuracy", "rm_top1_accuracy"):
                assert 0.0 <= float(r[k]) <= 1.0, (k, r)
            assert r["gold_reward"] == ""
        else:
            assert -1.0 <= float(r["gold_reward"]) <= 1.5 and 0.0 <= float(r["preference_accuracy"]) <= 1.0, r
    for r in grpo:  # the sample budget: prompts per step x G = the same number of completions for every G
        assert int(r["prompts_per_step"]) * int(r["group_size"]) == BUDGET, r
        assert int(r["train_examples"]) == int(r["prompts_per_step"]) * STEPS
        assert 0.0 <= float(r["frac_reward_zero_std"]) <= 1.0
    with open(wd / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == len(GS) * len(SEEDS) * STEPS  # the training reward of every step of every run
    with open(wd / "results.json") as f:
        res = json.load(f)
    assert res["seconds"] > 0 and len(res["group_size"]) == len(GS) and len(res["reward_models"]) == len(RMS)
    assert len(res["policies"]) == len(POLICIES) and res["verdicts"]["group_size"].startswith("**At a fixed")
    # results.md: mean ± std of every cell = the csv's numbers
    md = (wd / "results.md").read_text()
    sec_a, sec_b = md.split("## (a)")[1].split("## (b)")
    for g in GS:
        cells = _cell_values(sec_a, f"{g} |")
        vals = [float(r["gold_reward"]) for r in grpo if int(r["group_size"]) == g]
        assert cells[0] == (pytest.approx(np.mean(vals), abs=6e-4), pytest.approx(np.std(vals, ddof=1), abs=6e-4))
    rm_sec, pol_sec = sec_b.split("### Policies")
    for methods, sec, key in ((RMS, rm_sec, "rm_pair_accuracy"), (POLICIES, pol_sec, "gold_reward")):
        for m in methods:
            vals = [float(r[key]) for r in rows if r["method"] == m]
            mean, std = _cell_values(sec, f"{m} (")[0]
            assert mean == pytest.approx(np.mean(vals), abs=6e-4) and std == pytest.approx(np.std(vals, ddof=1),
                                                                                           abs=6e-4), m
    assert "**Does a ranking carry more signal per annotation" in md
    assert res["verdicts"]["annotation"] and res["verdicts"]["comparisons"]
    import matplotlib.image

    img = matplotlib.image.imread(str(wd / "results.png"))
    assert img.ndim == 3 and img.shape[1] > 1000 and img.shape[0] > 700


def test_training_files_are_the_rankings_pairs(out, gs):
    wd, rows, _ = out
    groups = _read_jsonl(wd / "toy_data" / "groups_ranked.jsonl")[:N_GROUPS]
    assert _read_jsonl(wd / "data" / "groups.jsonl") == groups
    implied = [(json.dumps(g["prompt"]), json.dumps(g["responses"][i]), json.dumps(g["responses"][j]))
               for g in groups for i in range(4) for j in range(4) if g["ranks"][i] < g["ranks"][j]]
    got = [(json.dumps(p["prompt"]), json.dumps(p["chosen"]), json.dumps(p["rejected"]))
           for p in _read_jsonl(wd / "data" / "pairs_all.jsonl")]
    assert got == implied
    assert {int(r["train_pairs"]) for r in rows if r["method"] in ("PL", "listwise_DPO")} == {len(implied)}
    for seed in SEEDS:
        half = _read_jsonl(wd / "data" / f"pairs_half_seed{seed}.jsonl")
        assert half == gs.derived_pairs(groups, "pairs_half", seed)  # deterministic in the seed
        # per group at most K/2 = 2 pairs, of disjoint responses, each ordered as the ranking says
        rng, n = np.random.default_rng([gs.PAIRING_SALT, seed]), 0
        for g in groups:
            h = gs.half_pairs(g, rng)
            idx = [(g["responses"].index(p["chosen"]), g["responses"].index(p["rejected"])) for p in h]
            assert len(h) <= 2 and all(g["ranks"][i] < g["ranks"][j] for i, j in idx)
            assert len({json.dumps(p[k]) for p in h for k in ("chosen", "rejected")}) <= 2 * len(h)
            n += len(h)
        assert n == len(half) < len(implied)
    assert gs.derived_pairs(groups, "pairs_half", 0) != gs.derived_pairs(groups, "pairs_half", 1)


def test_rerun_trains_nothing(out):
    wd, rows, first_log = out
    assert "training listwise_dpo" in first_log and "training grpo grpo" in first_log
    log = _run(wd)
    assert "] training " not in log and "already done" in log  # every run and the SFT stage are read back
    with open(wd / "runs.csv", newline="") as f:
        again = list(csv.DictReader(f))
    assert again == rows


def test_pairs_from_a_ranking_by_hand(gs):
    g = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 1, 3]}
    assert [(p["chosen"], p["rejected"]) for p in gs.all_pairs(g)] == \
        [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]  # b, c tied: no pair
    assert len(gs.all_pairs({"prompt": "p", "responses": list("abcd"), "ranks": [0, 1, 2, 3]})) == 6
    rng = np.random.default_rng(5)
    perm = np.random.default_rng(5).permutation(4)  # the matching half_pairs draws
    half = gs.half_pairs(g, rng)
    want = []
    for a, b in ((perm[0], perm[1]), (perm[2], perm[3])):
        if g["ranks"][a] != g["ranks"][b]:
            x, y = (a, b) if g["ranks"][a] < g["ranks"][b] else (b, a)
            want.append((g["responses"][x], g["responses"][y]))
    assert [(p["chosen"], p["rejected"]) for p in half] == want
    # every matching of 4 responses: 2 disjoint pairs, a tied pair dropped
    for seed in range(20):
        h = gs.half_pairs(g, np.random.default_rng(seed))
        shown = [x for p in h for x in (p["chosen"], p["rejected"])]
        assert len(shown) == len(set(shown)) and len(h) in (1, 2)
        assert all(g["ranks"][g["responses"].index(p["chosen"])] < g["ranks"][g["responses"].index(p["rejected"])]
                   for p in h)


def test_top1_and_verdicts_on_hand_made_numbers(gs):
    # group 0: ranks [0, 1, 2] -> pairs (0,1) (0,2) (1,2); group 1: ranks [0, 0, 1] -> pairs (0,2) (1,2)
    meta = {"group": [0, 0, 0, 1, 1], "chosen_rank": [0, 0, 1, 0, 0], "rejected_rank": [1, 2, 2, 1, 1]}
    # group 0 scores: best 1.0, middle 2.0 (wrong top-1); group 1: best ones 0.5 and 3.0, worst 1.0 (right)
    chosen = np.array([1.0, 1.0, 2.0, 0.5, 3.0])
    rejected = np.array([2.0, 0.0, 0.0, 1.0, 1.0])
    assert gs.top1_accuracy(chosen, rejected, meta) == 0.5
    chosen[0] = chosen[1] = 2.5
    assert gs.top1_accuracy(chosen, rejected, meta) == 1.0
    assert gs.separated((1.0, 0.1, 3), (0.5, 0.1, 3)) == "higher"
    assert gs.separated((0.5, 0.1, 3), (1.0, 0.1, 3)) == "lower"
    assert gs.separated((0.8, 0.2, 3), (0.6, 0.1, 3)) == "indistinguishable"

    def agg_of(per_g):
        rows = [{"group_size": g, "seed": s, "gold_reward": v, "train_reward_first": 0, "train_reward_last": 0,
                 "frac_reward_zero_std": 0, "preference_accuracy": 0}
                for g, vals in per_g.items() for s, v in enumerate(vals)]
        return gs.ab.aggregate(rows, ("group_size",), gs.GRPO_KEYS)

    rising = agg_of({2: [0.5, 0.6, 0.55], 4: [0.7, 0.72, 0.71], 8: [0.9, 0.95, 0.92]})
    assert "Supported: the gold reward rises with G" in gs.grpo_verdict(rising)
    assert "above G = 2 in 3 of 3 seeds" in gs.grpo_verdict(rising)
    falling = agg_of({2: [0.9, 0.95, 0.92], 4: [0.7, 0.72, 0.71], 8: [0.5, 0.6, 0.55]})
    assert "Not supported: the gold reward falls with G" in gs.grpo_verdict(falling)
    flat = agg_of({2: [0.5, 0.9, 0.7], 8: [0.6, 0.8, 0.75]})
    assert "Inconclusive at this size" in gs.grpo_verdict(flat)
    assert gs.grpo_verdict(agg_of({2: [0.5]})).startswith("Not answered")
    lines = ["- x: PL 0.8 vs BT_all 0.7: PL is **higher** (…)", "- y: listwise_DPO is **indistinguishable**",
             "- z: GRPO_offline is **lower**"]
    assert gs.annotation_verdict(lines).startswith("Supported in 1 of 2")
    assert gs.annotation_verdict(lines[1:]).startswith("Inconclusive")
    assert gs.annotation_verdict(lines[2:]).startswith("Not answered")
    np.testing.assert_allclose(gs.smooth(np.array([[1.0, 3.0, 5.0, 7.0]]), 2), [[1.0, 2.0, 4.0, 6.0]])
