"""experiments/compare_techniques.py at --size=tiny end to end (outputs exist and parse, the grid is complete, FLOPs
come from the programs each method runs, model calls match the hand-computed counts, a rerun trains nothing), and its
pure helpers on hand-made inputs (noisy labels, roughness, the FLOP counter on a matmul, model-call formulas,
aggregation and verdicts)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT, load_experiment

# the tiny size: RLHF and DPO clean, DPO with 30 % flipped pairs, seed 0
GRID = {("RLHF", 0.0, 0), ("DPO", 0.0, 0), ("DPO", 0.3, 0)}
# model calls of the tiny size, by hand (4 steps, 8 completions per step; configs' N = 12 tokens):
#   DPO   4 steps x 4 pairs x 2 sequences, policy + reference                          = 32 + 32 = 64
#   RLHF  RM 4 x 4 x 2 = 32; PPO one rollout of 8 prompts: prefill 8, policy 8 + 4 x 8, value 8 + 4 x 8,
#         reference 8, reward 8, 8 x 12 tokens                                         = 32 + 104 + 96 = 232
CALLS = {"DPO": 64, "RLHF": 232}




@pytest.fixture(scope="module")
def ct():
    return load_experiment("compare_techniques")


def _run(wd):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))  # one CPU device
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compare_techniques.py"),
                        f"--workdir={wd}", "--size=tiny"], capture_output=True, text=True, cwd=ROOT, timeout=1800,
                       env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    wd = tmp_path_factory.mktemp("compare")
    log = _run(wd)
    with open(wd / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return wd, rows, log


def test_outputs_exist_grid_complete_and_values_real(out, ct):
    wd, rows, _ = out
    for name in ("runs.csv", "results.md", "results.json", "results.png"):
        assert (wd / name).stat().st_size > 0, name
    assert list(rows[0]) == ct.CSV_FIELDS
    assert {(r["method"], float(r["noise"]), int(r["seed"])) for r in rows} == GRID and len(rows) == len(GRID)
    for r in rows:
        assert -1.0 <= float(r["gold_reward"]) <= 1.5, r
        for k in ("correctness", "instruction_following", "safety", "over_refusal", "preference_accuracy"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r)
        assert math.isfinite(float(r["kl"])) and float(r["seconds"]) > 0, r
        flops = {k: float(r[f"flops_{k}"]) for k in ct.FLOP_KINDS}
        assert float(r["train_flops"]) == pytest.approx(sum(flops.values()))
        assert flops["train_step"] > 1e6, r  # XLA's count of a real step of a 0.8 M-parameter model
        online = r["method"] == "RLHF"
        assert (flops["sampler"] > 0) == online and (int(r["decode_steps"]) > 0) == online, r
        assert (flops["ppo_rollout"] > 0) == (r["method"] == "RLHF"), r
        assert flops["logps"] == 0, r  # GRPO's π_ref forward (not in the tiny grid)
        assert int(r["model_calls"]) == CALLS[r["method"]], r
        assert int(r["model_calls"]) == int(r["forward_calls"]) + int(r["generated_tokens"])
        assert int(r["flipped"]) == (round(0.3 * 2000) if float(r["noise"]) else 0), r
        assert r["resumed"] == "False"
    rlhf = next(r for r in rows if r["method"] == "RLHF")
    assert 0.0 <= float(rlhf["rm_accuracy"]) <= 1.0
    for r in rows:  # RLHF (its reward model) and DPO both imply preference probabilities: calibrated against the toy's
        assert 0.0 < float(r["prob_error"]) < 1.0 and 0.0 <= float(r["ece"]) <= float(r["prob_error"]) + 1e-9, r
    # the noisy DPO run trained on the flipped file, the clean one on the toy pairs
    sig = json.loads((wd / "runs" / "DPO_noise0.3_seed0" / "result.json").read_text())["signature"]
    assert sig["train"].endswith("noisy/pairs_noise0.3_seed0.jsonl") and sig["noise"] == 0.3
    with open(wd / "results.json") as f:
        res = json.load(f)
    assert res["seconds"] > 0 and len(res["cells"]) == 3 and res["verdicts"]
    # results.md: the description's table, a row per method with the measured gold reward = the csv's
    md = (wd / "results.md").read_text()
    assert "| technique | complexity | strengths | drawbacks |" in md and "## Claims" in md
    for m in ("RLHF", "DPO"):
        line = next(x for x in md.splitlines() if x.startswith(f"| {ct.LABELS[m]} |"))
        gold = float(line.split("|")[5].split()[0])
        assert gold == pytest.approx(float(next(r for r in rows if r["method"] == m and not float(r["noise"]))
                                           ["gold_reward"]), abs=6e-4)
    import matplotlib.image

    img = matplotlib.image.imread(str(wd / "results.png"))
    assert img.ndim == 3 and img.shape[1] > 1000 and img.shape[0] > 500


def test_noisy_pairs_flip_exactly_the_seeds_draw(out, ct):
    wd, _, _ = out
    read = lambda p: [json.loads(x) for x in open(p)]  # noqa: E731
    clean, noisy = read(wd / "toy_data" / "pairs.jsonl"), read(wd / "noisy" / "pairs_noise0.3_seed0.jsonl")
    swapped = [i for i, (a, b) in enumerate(zip(clean, noisy)) if a["chosen"] != b["chosen"]]
    assert swapped == ct.flip_indices(len(clean), 0.3, 0).tolist() and len(swapped) == 600
    assert all((noisy[i]["chosen"], noisy[i]["rejected"]) == (clean[i]["rejected"], clean[i]["chosen"])
               for i in swapped)


def test_rerun_trains_nothing(out):
    wd, rows, first_log = out
    assert "] training " in first_log
    log = _run(wd)
    assert "] training " not in log and "already done" in log
    with open(wd / "runs.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows


def test_noise_helpers_on_hand_made_data(ct):
    for n, frac in ((10, 0.3), (2000, 0.3), (500, 0.3), (5, 0.0)):
        idx = ct.flip_indices(n, frac, 1)
        assert len(idx) == round(frac * n) and len(set(idx.tolist())) == len(idx)
    np.testing.assert_array_equal(ct.flip_indices(50, 0.3, 2), ct.flip_indices(50, 0.3, 2))
    with pytest.raises(Exception, match="0.5"):
        ct.flip_indices(10, 0.5, 0)
    assert ct.reverse_ranks([0, 0, 0, 3]) == [1, 1, 1, 0]
    assert ct.reverse_ranks([0, 1, 2, 3]) == [3, 2, 1, 0]
    assert ct.reverse_ranks([2, 0, 1]) == [0, 2, 1]
    groups = [{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}, {"prompt": "q", "responses": ["c", "d"],
                                                                          "ranks": [1, 0]}]
    assert [g["ranks"] for g in ct.noisy_records("groups_ranked", groups, [1])] == [[0, 1], [0, 1]]
    soft = [{"chosen": "c", "rejected": "r", "chosen_prob": 0.8}]
    assert ct.noisy_records("pairs_soft", soft, [0])[0]["chosen_prob"] == pytest.approx(0.2)
    assert ct.noisy_records("pairs", soft, [0])[0]["chosen"] == "r" and soft[0]["chosen"] == "c"  # copies


def test_roughness_on_known_curves(ct):
    t = np.arange(20.0)
    assert ct.roughness(10 - t) == pytest.approx(0.0, abs=1e-12)  # a straight line has no noise
    # ± a alternating around a line: residual 0.8 a everywhere, drop 15 + 2a/5
    assert ct.roughness(10 - t + 0.5 * (-1.0) ** t) == pytest.approx(0.4 / 15.2)
    assert ct.roughness(t) == float("inf") and math.isnan(ct.roughness(t[:5]))


def test_flop_counter_counts_xla_flops_of_each_call(ct):
    import jax
    import jax.numpy as jnp

    counter = {k: 0.0 for k in ct.FLOP_KINDS}
    counter.update(decode_steps=0, seconds=0.0, tag="test")
    f = ct._Counted(jax.jit(lambda x, y: x @ y), "train_step", counter)
    x, y = jnp.ones((8, 16)), jnp.ones((16, 4))
    np.testing.assert_allclose(f(x, y), 16.0)
    f(x, y)
    assert counter["train_step"] == pytest.approx(2 * (2 * 8 * 16 * 4), rel=0.01)  # 2 calls of 1024 FLOPs
    f(jnp.ones((4, 16)), y)  # another shape: its own count
    assert counter["train_step"] == pytest.approx(2048 + 512, rel=0.01)


def test_model_call_formulas(ct):
    import ml_collections

    cfg = ml_collections.ConfigDict({"total_steps": 60, "batch_size": 16, "data": {"group_size": 4}})
    assert ct.total_calls(ct.model_calls("DPO", cfg)) == 60 * 32 * 2
    assert ct.total_calls(ct.model_calls("ORPO", cfg)) == 60 * 32
    assert ct.total_calls(ct.model_calls("RM", cfg)) == 60 * 32
    cfg.batch_size = 8
    assert ct.total_calls(ct.model_calls("GRPO_offline", cfg)) == 60 * 32
    g = ml_collections.ConfigDict({"total_steps": 60, "batch_size": 4, "loss": {"reference_free": False},
                                   "grpo": {"num_generations": 8, "max_completion_length": 12, "num_iterations": 1}})
    calls = ct.model_calls("GRPO_online", g)
    assert calls["forward"] == {"policy": 1920, "prefill": 240, "reference": 1920} and calls["generated"] == 23040
    p = ml_collections.ConfigDict({"total_steps": 60, "batch_size": 32,
                                   "ppo": {"num_ppo_epochs": 4, "num_mini_batches": 1, "response_length": 12}})
    calls = ct.model_calls("PPO", p)  # 15 rollouts of 32 prompts, 60 updates of 32 rows
    assert calls["forward"] == {"prefill": 480, "policy": 480 + 1920, "value": 480 + 1920, "reference": 480,
                                "reward": 480} and calls["generated"] == 480 * 12


def _rows(values):
    """{(method, noise): [per-seed dict]} -> csv-like rows."""
    return [{"method": m, "noise": n, "seed": s, **d} for (m, n), per_seed in values.items()
            for s, d in enumerate(per_seed)]


def test_aggregate_and_verdicts_on_hand_made_numbers(ct):
    keys = [k for k, _, _ in ct.METRICS] + ["roughness", "prob_error", "ece"]

    def cell(gold, seconds, flops, calls, rough=0.1, **kw):
        d = dict.fromkeys(keys, 0.5)
        d.update(gold_reward=gold, seconds=seconds, train_flops=flops, model_calls=calls, roughness=rough, **kw)
        return d

    values = {("RLHF", 0.0): [cell(1.2, 100, 1e12, 9e4), cell(1.3, 110, 1e12, 9e4), cell(1.25, 105, 1e12, 9e4)],
              ("DPO", 0.0): [cell(1.0, 20, 1e11, 4e3, 0.2), cell(1.02, 21, 1e11, 4e3, 0.21),
                             cell(0.98, 22, 1e11, 4e3, 0.19)],
              ("DPO", 0.3): [cell(0.6, 20, 1e11, 4e3), cell(0.62, 21, 1e11, 4e3), cell(0.58, 22, 1e11, 4e3)],
              ("ORPO", 0.0): [cell(1.0, 15, 5e10, 2e3, 0.05, ece=0.1), cell(1.1, 15, 5e10, 2e3, 0.06, ece=0.12),
                              cell(0.9, 15, 5e10, 2e3, 0.04, ece=0.11)],
              ("ORPO", 0.3): [cell(0.95, 15, 5e10, 2e3), cell(1.05, 15, 5e10, 2e3), cell(0.85, 15, 5e10, 2e3)],
              ("GRPO_online", 0.0): [cell(1.1, 50, 5e11, 8e4), cell(1.12, 52, 5e11, 8e4), cell(1.14, 51, 5e11, 8e4)]}
    agg = ct.aggregate(_rows(values))
    mean, std, n = agg[("DPO", 0.0)]["gold_reward"]
    assert (mean, n) == (pytest.approx(1.0), 3) and std == pytest.approx(0.02)  # sample std, ddof 1
    d = ct.drop(agg, "DPO", "gold_reward", 0.3)
    assert d[0] == pytest.approx(0.4) and d[1] == pytest.approx(0.0, abs=1e-12) and d[2] == 3
    assert ct.compare((0.1, 0.05, 3), (0.5, 0.1, 3)) == "lower"
    assert ct.compare((0.5, 0.1, 3), (0.1, 0.05, 3)) == "higher"
    assert ct.compare((0.3, 0.15, 3), (0.5, 0.1, 3)) == "not distinguishable"
    c = ct.get_config()
    c.methods = ("RLHF", "DPO", "ORPO", "GRPO_online")
    lines = {x.split(":")[0]: x for x in ct.verdicts(agg, c)}
    assert "**holds**" in lines['- RLHF "expensive" (the largest seconds, FLOPs and model calls)']
    assert "**holds**" in next(v for k, v in lines.items() if "maximum alignment" in k)  # 1.25 ± 0.05 above all
    assert "**holds**" in next(v for k, v in lines.items() if 'DPO "fast"' in k)
    assert "**holds**" in next(v for k, v in lines.items() if 'ORPO "smooth' in k)  # 0.05 ± 0.01 vs 0.2 ± 0.01
    assert "**holds**" in next(v for k, v in lines.items() if 'ORPO "robust' in k)  # drop 0.05 vs 0.4
    assert "**holds**" in next(v for k, v in lines.items() if 'ORPO "calibrated' in k)  # ECE 0.11 ± 0.01 vs 0.5
    assert "**holds**" in next(v for k, v in lines.items() if "more expressive" in k)  # 1.12 ± 0.02 vs 1.0 ± 0.02
    assert "**holds**" in next(v for k, v in lines.items() if "more intensive" in k)
    # DPO's seed std (0.02) vs the others' median (RLHF 0.05, ORPO 0.1, GRPO 0.02 -> 0.05): stable
    assert "**holds**" in next(v for k, v in lines.items() if 'DPO "stable' in k)
    md = ct.markdown(agg, {"gold_reward": 0.4, "correctness": 0.3}, c, 1.0)
    assert "| DPO | one stage" in md and "1.000 ± 0.020" in md
    orpo = next(x for x in md.splitlines() if x.startswith(f"| {ct.LABELS['ORPO']} |"))
    assert orpo.split("|")[-2].strip() == "0.110 ± 0.010"  # the ECE column
    values[("DPO", 0.0)][0]["ece"] = 0.05  # DPO's ECE 0.35 ± 0.26: no longer distinguishable
    lines = {x.split(":")[0]: x for x in ct.verdicts(ct.aggregate(_rows(values)), c)}
    assert "**not distinguishable**" in next(v for k, v in lines.items() if 'ORPO "calibrated' in k)
