"""experiments/reward_kl_frontier.py at --size=tiny end to end (outputs exist and parse, the grid is complete, the
SFT point has KL 0, the evaluation's log-probs agree with the sampler's, PPO-gold's rollouts were scored by the gold
reward, a rerun trains nothing), and its pure helpers on hand-made inputs (KL estimate, frontier, verdict, flags)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT, load_experiment

METHODS, VALUES, SEEDS = ("DPO", "PPO-gold"), {"DPO": (0.1, 0.3), "PPO-gold": (0.05, 0.2)}, (0, 1)  # the tiny size




@pytest.fixture(scope="module")
def fr():
    return load_experiment("reward_kl_frontier")


def _run(wd, *extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))  # one CPU device
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "reward_kl_frontier.py"), f"--workdir={wd}",
                        "--size=tiny", *extra], capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    return p


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    wd = tmp_path_factory.mktemp("frontier")
    p = _run(wd, "--jobs=2")  # the seeds in two processes (ablation.parallel_seeds)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(wd / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return wd, rows, p.stdout + p.stderr


def test_two_jobs_give_the_numbers_of_one(out, tmp_path):
    """The seeds split over two processes (one CPU each) compute what one process computes: a cell rerun alone
    in a fresh workdir gives the same numbers."""
    wd, rows, log = out
    assert "child 1 on CPU" in log and (wd / "jobs_1.log").exists()
    p = _run(tmp_path, "--methods=DPO", "--values=DPO:0.3", "--seeds=1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "runs.csv", newline="") as f:
        (alone,) = list(csv.DictReader(f))
    (par,) = [r for r in rows if r["run"] == alone["run"]]
    for k in ("kl", "gold_sample", "gold_greedy", "mean_length"):
        assert float(alone[k]) == float(par[k]), (k, alone[k], par[k])


def test_outputs_exist_and_parse(out, fr):
    wd, rows, _ = out
    for name in ("runs.csv", "results.md", "results.json", "results.png"):
        assert (wd / name).stat().st_size > 0, name
    assert list(rows[0]) == fr.CSV_FIELDS
    want = {(m, v, s) for m in METHODS for v in VALUES[m] for s in SEEDS}
    assert {(r["method"], float(r["value"]), int(r["seed"])) for r in rows} == want and len(rows) == len(want)
    for r in rows:
        assert math.isfinite(float(r["kl"])) and float(r["kl_sem"]) >= 0, r
        assert -3.0 <= float(r["gold_sample"]) <= 1.5 and -3.0 <= float(r["gold_greedy"]) <= 1.5, r
        assert 1 <= float(r["mean_length"]) <= 12 and 0 <= float(r["no_eos"]) <= 1, r
        # the evaluation's log π of the samples (completion_logps_jit) = the sampler's own log-probs
        assert float(r["logp_check"]) < 1e-4, r
        assert r["run"] == f"{r['method']}_{float(r['value']):g}_seed{r['seed']}", r
    res = json.loads((wd / "results.json").read_text())
    assert res["seconds"] > 0 and len(res["cells"]) == 4 and res["verdict"]
    assert res["sft"]["kl"] == 0.0  # the SFT model against itself: every log-ratio is exactly 0
    for cell in res["cells"]:  # mean ± sample std over the seeds, as runs.csv
        vals = [float(r["kl"]) for r in rows if r["method"] == cell["method"] and float(r["value"]) == cell["value"]]
        assert cell["kl"][0] == pytest.approx(np.mean(vals)) and cell["kl"][1] == pytest.approx(np.std(vals, ddof=1))
    md = (wd / "results.md").read_text()
    assert "## Does DPO attain the best reward–KL frontier?" in md
    line = next(x for x in md.splitlines() if x.startswith("| DPO | β = 0.1 |"))
    kl_cell = line.strip("|").split("|")[3]
    mean, std = (float(v) for v in kl_cell.split("±"))
    vals = [float(r["kl"]) for r in rows if r["method"] == "DPO" and float(r["value"]) == 0.1]
    assert mean == pytest.approx(np.mean(vals), abs=6e-4) and std == pytest.approx(np.std(vals, ddof=1), abs=6e-4)
    import matplotlib.image

    img = matplotlib.image.imread(str(wd / "results.png"))
    assert img.ndim == 3 and img.shape[1] > 800 and img.shape[0] > 300


def test_ppo_gold_rollouts_are_scored_by_the_gold_reward(out):
    """PPO-gold's logged samples carry the toy task's gold reward of their completion (not a reward model's score)."""
    from align_jax.data.toy import scoring

    wd, _, _ = out
    n = 0
    for v in VALUES["PPO-gold"]:
        with open(wd / "runs" / f"PPO-gold_{v:g}_seed0" / "samples.jsonl") as f:
            for line in f:
                s = json.loads(line)
                prompt = s["prompt"].removeprefix("user: ")
                assert s["reward"] == pytest.approx(scoring.gold_reward(prompt, s["completion"]), abs=1e-6), s
                n += 1
    assert n >= 8


def test_rerun_trains_nothing_and_refuses_other_settings(out):
    wd, rows, first_log = out
    first_log += "".join(open(f).read() for f in sorted(wd.glob("jobs_*.log")))  # the --jobs children's cells
    assert "training dpo" in first_log and "training ppo" in first_log
    p = _run(wd)
    assert p.returncode == 0, p.stderr[-3000:]
    rerun = p.stdout + p.stderr + "".join(open(f).read() for f in sorted(wd.glob("jobs_*.log")))  # rewritten
    assert "] training " not in rerun and "already done" in p.stdout + p.stderr
    with open(wd / "runs.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows
    p = _run(wd, "--values=DPO:0.1", "--methods=DPO", "--seeds=0", "--sft_steps=3")  # another SFT: refused, 1 line
    assert p.returncode != 0 and "another --workdir" in p.stderr and "Traceback" not in p.stderr


def test_kl_estimate_on_hand_made_log_probs(fr):
    logp = np.array([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]])
    ref = np.array([[-1.5, -2.0, -3.0], [-0.7, -0.1, 0.0]])
    mask = np.array([[1, 1, 0], [1, 1, 0]])  # the third slot is padding: not counted
    kl, sem, per = fr.kl_estimate(logp, ref, mask)
    np.testing.assert_allclose(per, [0.5, 0.3])
    assert kl == pytest.approx(0.4) and sem == pytest.approx(np.std([0.5, 0.3], ddof=1) / np.sqrt(2))
    assert fr.kl_estimate(ref, ref, mask)[0] == 0.0


def test_frontier_and_verdict_on_hand_made_points(fr):
    pts = [(1.0, 0.5), (2.0, 0.8), (4.0, 0.7)]
    assert fr.frontier_reward(pts, 0.5) == -np.inf and fr.frontier_reward(pts, 1.5) == 0.5
    assert fr.frontier_reward(pts, 5.0) == 0.8

    def agg(points):  # {method: [(kl, reward), ...]} -> aggregate's shape
        return {(m, float(i)): {"kl": (k, 0.0, 3), "gold_sample": (r, 0.0, 3)}
                for m, ps in points.items() for i, (k, r) in enumerate(ps)}

    dpo = [(1.0, 0.6), (3.0, 1.0)]
    head, lines = fr.frontier_verdict(agg({"DPO": dpo, "PPO-gold": [(2.0, 0.5), (5.0, 0.9)]}), ("DPO", "PPO-gold"))
    assert head.startswith("Supported") and "PPO-gold: DPO dominates" in lines[0]
    head, lines = fr.frontier_verdict(agg({"DPO": dpo, "PPO-gold": [(2.0, 0.9), (5.0, 0.9)]}), ("DPO", "PPO-gold"))
    assert head.startswith("Not supported") and "PPO-gold reaches" in head and "cross" in lines[0]
    head, lines = fr.frontier_verdict(agg({"DPO": dpo, "PPO-RM": [(0.5, 0.7), (2.5, 1.1)], "GRPO": [(0.5, 1.2)]}),
                                      ("DPO", "PPO-RM", "GRPO"))
    assert head.startswith("Not supported") and all("dominates" in x for x in lines)
    head, _ = fr.frontier_verdict(agg({"DPO": dpo, "PPO-RM": [(2.0, 0.1)], "GRPO": [(0.5, 1.2)]}),
                                  ("DPO", "PPO-RM", "GRPO"))
    assert head.startswith("Partly supported")
    # below DPO's lowest KL: without the SFT start DPO has no point there, with it the start is the frontier
    head, lines = fr.frontier_verdict(agg({"DPO": dpo, "ORPO": [(0.2, -1.0)]}), ("DPO", "ORPO"))
    assert "cross" in lines[0] and "none at that KL" in lines[0]
    head, lines = fr.frontier_verdict(agg({"DPO": dpo, "ORPO": [(0.2, -1.0)]}), ("DPO", "ORPO"), start=(0.0, 0.0))
    assert head.startswith("Supported")
    head, lines = fr.frontier_verdict(agg({"DPO": dpo, "ORPO": [(0.2, 0.1)]}), ("DPO", "ORPO"), start=(0.0, 0.0))
    assert "cross" in lines[0] and "KL 0.20 ± 0.00: 0.100 ± 0.000 (n = 3) vs DPO's 0.000" in lines[0]


def test_parse_values(fr):
    assert fr.parse_values(["DPO:0.1/0.3", "GRPO:0"]) == {"DPO": (0.1, 0.3), "GRPO": (0.0,)}
    assert fr.parse_values(None) == {}
    for bad in (["DPO"], ["XPO:0.1"], ["DPO:a"], ["DPO:-1"], ["DPO:"]):
        with pytest.raises(Exception, match="--values"):
            fr.parse_values(bad)
