"""experiments/length_bias.py at --size=tiny end to end (outputs exist and parse, the grid is complete, the length log
holds one rollout per step and the same seed's first rollout is shared by every aggregation, a rerun trains nothing),
and its pure helpers on hand-made inputs (correctness and lengths, per-step statistics, windows, the verdict)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT, load_experiment

AGGS, SEEDS, STEPS, ROWS, CAP = ("grpo", "dr_grpo"), (0, 1), 3, 4 * 2, 16  # the tiny size




@pytest.fixture(scope="module")
def lb():
    return load_experiment("length_bias")


def _run(wd):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))  # one CPU device
    if not env["XLA_FLAGS"]:
        del env["XLA_FLAGS"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "length_bias.py"), f"--workdir={wd}",
                        "--size=tiny"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    wd = tmp_path_factory.mktemp("length_bias")
    log = _run(wd)
    with open(wd / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return wd, rows, log


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_outputs_exist_and_parse(out, lb):
    wd, rows, _ = out
    for name in ("runs.csv", "curves.csv", "results.md", "results.json", "results.png"):
        assert (wd / name).stat().st_size > 0, name
    assert list(rows[0]) == lb.CSV_FIELDS
    assert sorted((r["aggregation"], int(r["seed"])) for r in rows) == sorted((a, s) for a in AGGS for s in SEEDS)
    for r in rows:
        assert int(r["steps"]) == STEPS and float(r["seconds"]) > 0
        assert r["run"] == f"{r['aggregation']}_seed{r['seed']}"
        for k in ("len_incorrect_first", "len_incorrect_last", "len_all_first", "len_all_last"):
            v = float(r[k])
            assert math.isnan(v) or 1 <= v <= CAP, (k, r)
        for k in ("accuracy_first", "accuracy_last", "clipped_last"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r)
    with open(wd / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == len(AGGS) * len(SEEDS) * STEPS
    for c in curves:  # each step's counts: the benign completions of 4 prompts x 2 samples
        assert int(c["n_correct"]) + int(c["n_incorrect"]) <= ROWS and 1 <= float(c["len_all"]) <= CAP
    with open(wd / "results.json") as f:
        res = json.load(f)  # strict JSON: NaN written as null
    assert res["seconds"] > 0 and [c["aggregation"] for c in res["cells"]] == list(AGGS)
    assert res["config"]["steps"] == STEPS and res["verdict"]
    assert len(res["curves"]["len_incorrect"]["grpo"]["mean"]) == STEPS
    # results.md: a row per aggregation with mean ± std of the csv's numbers
    md = (wd / "results.md").read_text()
    header = next(x for x in md.splitlines() if x.startswith("| aggregation |"))
    labels = [c.strip() for c in header.strip("|").split("|")[1:]]
    assert labels == [label for _, label in lb.TABLE_KEYS]
    for a in AGGS:
        line = next(x for x in md.splitlines() if x.startswith(f"| {a} |"))
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        for (key, _), cell in zip(lb.TABLE_KEYS, cells):
            vals = np.array([float(r[key]) for r in rows if r["aggregation"] == a])
            if np.isnan(vals).any():
                continue
            mean, std = (float(v) for v in cell.split("±"))
            assert mean == pytest.approx(vals.mean(), abs=6e-3) and std == pytest.approx(vals.std(ddof=1), abs=6e-3)
    import matplotlib.image

    img = matplotlib.image.imread(str(wd / "results.png"))
    assert img.ndim == 3 and img.shape[1] > 800 and img.shape[0] > 300


def test_length_log_is_one_rollout_per_step_and_matches_the_trainer(out):
    wd, _, _ = out
    first = {}
    for a in AGGS:
        for s in SEEDS:
            rd = wd / "runs" / f"{a}_seed{s}"
            recs = _read_jsonl(rd / "lengths.jsonl")
            metrics = [m for m in _read_jsonl(rd / "metrics.jsonl") if "loss" in m]
            assert len(recs) == len(metrics) == STEPS
            for rec, m in zip(recs, metrics):
                assert len(rec["lengths"]) == len(rec["correct"]) == ROWS
                assert all(1 <= n <= CAP for n in rec["lengths"]) and set(rec["correct"]) <= {0, 1, None}
                assert np.mean(rec["lengths"]) == pytest.approx(m["completions/mean_length"])
            assert not (rd / "checkpoints").exists()  # a finished run keeps result.json, not its checkpoints
            first[(a, s)] = recs[0]
    for s in SEEDS:  # step 1 samples from the SFT model with the seed's key: the same for every aggregation
        assert first[("grpo", s)] == first[("dr_grpo", s)]
    assert first[("grpo", 0)] != first[("grpo", 1)]


def test_rerun_trains_nothing(out):
    wd, rows, first_log = out
    assert "training grpo:grpo" in first_log and "training grpo:dr_grpo" in first_log
    log = _run(wd)
    assert "] training " not in log and "already done" in log  # every run and the SFT stage are read back
    with open(wd / "runs.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows


def test_correctness_and_lengths_on_hand_made_completions(lb, tmp_path):
    q = "What is 3 + 4? Give only the answer."
    secret = "Tell me the secret password. Give only the answer."
    prompts = [q, q, q, q, secret]
    completions = ["7", "The answer is 7.", "so it is 7", "8", "I cannot share that."]
    ids = [[5, 2], [1, 2, 3, 4, 5, 6, 7, 2], [9] * 12, [6, 2], [1, 2, 3, 4, 5, 2]]
    rewards, lengths, correct = lb.correctness_and_lengths(prompts, completions, ids)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0]  # the last alphanumeric token counts: a preamble costs nothing
    assert lengths == [2, 8, 12, 2, 6] and correct == [1, 1, 1, 0, None]
    log = tmp_path / "lengths.jsonl"
    for _ in range(3):
        assert lb.length_logging_correctness(prompts, completions, completion_ids=ids, log_path=str(log)) == rewards
    recs = lb.read_length_log(str(log))
    assert recs == [{"lengths": [2, 8, 12, 2, 6], "correct": [1, 1, 1, 0, None]}] * 3
    lb.truncate_length_log(str(log), 2)
    assert len(lb.read_length_log(str(log))) == 2
    st = lb.step_stats(recs[0])
    assert st["len_correct"] == pytest.approx(22 / 3) and st["len_incorrect"] == 2.0 and st["len_all"] == 6.0
    assert (st["n_correct"], st["n_incorrect"], st["accuracy"]) == (3, 1, 0.75)
    none_right = lb.step_stats({"lengths": [4, 6], "correct": [0, None]})
    assert math.isnan(none_right["len_correct"]) and none_right["accuracy"] == 0.0
    with pytest.raises(ValueError):
        lb.length_logging_correctness(prompts, completions)


def test_windows_checkpoints_and_config(lb, tmp_path):
    assert lb.window_mean([1, 2, float("nan"), 4, 6], 2, last=False) == 1.5
    assert lb.window_mean([1, 2, float("nan"), 4, 6], 3, last=True) == 5.0
    assert math.isnan(lb.window_mean([float("nan")] * 3, 2, last=True))
    curve = [{"len_correct": c, "len_incorrect": i, "len_all": 5.0, "accuracy": a, "clipped": 0.0}
             for c, i, a in ((3, 4, 0.2), (3, 6, 0.4), (2, 9, 0.5), (2, 11, 0.7))]
    s = lb.summarize(curve, 2)
    assert (s["len_incorrect_first"], s["len_incorrect_last"], s["d_len_incorrect"]) == (5.0, 10.0, 5.0)
    assert (s["len_correct_first"], s["len_correct_last"], s["gap_last"]) == (3.0, 2.0, 8.0)
    assert s["accuracy_last"] == pytest.approx(0.6) and s["steps"] == 4
    np.testing.assert_allclose(lb.smooth([1.0, 3.0, float("nan"), 5.0], 2), [1.0, 2.0, 3.0, 5.0])
    assert lb.last_checkpoint(str(tmp_path)) == 0
    for d in ("10", "20", "20.damaged", "tmp"):
        (tmp_path / "checkpoints" / d).mkdir(parents=True)
    assert lb.last_checkpoint(str(tmp_path)) == 20
    c = lb.get_config("tiny")
    for agg, (loss, scale) in (("grpo", ("grpo:grpo", "group")), ("dr_grpo", ("grpo:dr_grpo", "none")),
                               ("dapo", ("grpo:dapo", "group"))):
        cfg = lb.run_config(agg, 3, str(tmp_path), "/sft", "/log.jsonl", c)
        assert (cfg.loss.name, cfg.grpo.scale_rewards, cfg.seed) == (loss, scale, 3)
        assert cfg.grpo.max_completion_length == c.max_completion_length and cfg.grpo.num_iterations == 1
        assert tuple(cfg.rewards.functions) == (lb.REWARD_SPEC,)
        assert cfg.rewards.kwargs[lb.REWARD_SPEC]["log_path"] == "/log.jsonl"
    with pytest.raises(Exception, match="unknown size"):
        lb.get_config("huge")


def _rows(d_incorrect):
    """{aggregation: [per-seed Δ incorrect length]} -> csv-like rows."""
    return [{"aggregation": a, "seed": s, "d_len_incorrect": d, "gap_last": d / 2,
             **{k: 0.0 for k, _ in lb_table_keys() if k not in ("d_len_incorrect", "gap_last")}}
            for a, ds in d_incorrect.items() for s, d in enumerate(ds)]


def lb_table_keys():
    return (load_experiment("length_bias")).TABLE_KEYS


def test_paired_difference_and_verdict_on_hand_made_numbers(lb):
    rows = _rows({"grpo": [3.0, 4.0, 5.0], "dr_grpo": [0.5, 1.0, 0.0], "dapo": [1.0, 1.0, 1.0]})
    d = lb.paired(rows, "grpo", "dr_grpo", "d_len_incorrect")  # per seed 2.5, 3, 5
    assert d[0] == pytest.approx(3.5) and d[1] == pytest.approx(np.std([2.5, 3, 5], ddof=1)) and d[2] == 3
    assert lb.paired(rows, "grpo", "nothing", "d_len_incorrect") is None
    text = lb.verdict(rows, 10)
    assert text.startswith("**Supported at this size") and "larger under grpo in 3 of 3 seeds" in text
    assert "grpo 4.00 ± 1.00 tokens" in text and "dapo 1.00 ± 0.00" in text
    # incorrect completions grow more under grpo, but they grow under dr_grpo too: partly
    partly = lb.verdict(_rows({"grpo": [3.0, 4.0, 5.0], "dr_grpo": [2.0, 2.5, 3.0]}), 10)
    assert partly.startswith("**Partly supported") and "(2) they do not grow under dr_grpo: no, they grow" in partly
    assert lb.verdict(_rows({"grpo": [0.0, 1.0, -1.0], "dr_grpo": [0.5, 0.0, 0.0]}), 10).startswith(
        "**Not supported at this size")
    assert lb.verdict(_rows({"grpo": [0.0, 0.1, -1.0], "dr_grpo": [2.0, 2.5, 3.0]}), 10).startswith(
        "**Not supported (reversed)")
    assert lb.verdict(_rows({"grpo": [3.0], "dr_grpo": [0.0]}), 10).startswith("**Inconclusive: a single seed")
    assert lb.verdict(_rows({"grpo": [3.0, 4.0]}), 10).startswith("Not answered")
    agg = lb.aggregate(rows)
    mean, std, n = agg[("grpo",)]["d_len_incorrect"]
    assert (mean, std, n) == (pytest.approx(4.0), pytest.approx(1.0), 3)
