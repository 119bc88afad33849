"""experiments/overoptimization.py at --size=tiny end to end (outputs exist and parse, the grid is complete, the RMs
train on the first n pairs, best-of-n at n = 1 is the pool's mean, a rerun trains nothing), and its pure helpers on
hand-made inputs (the unbiased best-of-n estimator against brute force over subsets, KL of best-of-n, the
least-squares fits recovering known coefficients, peaks, windows)."""

import csv
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT, load_experiment

RM_PAIRS, SEEDS, BON_N, PPO_PAIRS, PPO_WINDOWS = (16, 48), (0,), (1, 2, 4), (16,), 2  # the tiny size




@pytest.fixture(scope="module")
def oo():
    return load_experiment("overoptimization")


def _run(wd):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))  # one CPU device
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "overoptimization.py"), f"--workdir={wd}",
                        "--size=tiny"], capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    wd = tmp_path_factory.mktemp("overopt")
    log = _run(wd)
    with open(wd / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return wd, rows, log


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_outputs_exist_and_parse(out, oo):
    wd, rows, _ = out
    for name in ("runs.csv", "results.md", "results.json", "results.png"):
        assert (wd / name).stat().st_size > 0, name
    assert list(rows[0]) == oo.CSV_FIELDS
    bon = [r for r in rows if r["method"] == "bon"]
    ppo = [r for r in rows if r["method"] == "ppo"]
    assert {(int(r["rm_pairs"]), int(r["seed"]), int(r["n"])) for r in bon} == \
        set(itertools.product(RM_PAIRS, SEEDS, BON_N))
    assert len(bon) == len(RM_PAIRS) * len(SEEDS) * len(BON_N)
    assert {(int(r["rm_pairs"]), int(r["seed"]), int(r["point"])) for r in ppo} == \
        set(itertools.product(PPO_PAIRS, SEEDS, range(PPO_WINDOWS + 1)))
    for r in rows:
        assert 0.0 <= float(r["rm_accuracy"]) <= 1.0, r
        assert -3.0 <= float(r["gold"]) <= 1.5, r
        assert math.isfinite(float(r["proxy"])) and float(r["d"]) >= 0, r
    for r in bon:
        n = int(r["n"])
        assert float(r["kl"]) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-9)
        assert float(r["d"]) == pytest.approx(math.sqrt(float(r["kl"])), abs=1e-9)
        assert 0.0 <= float(r["kl_pool"]) <= float(r["kl"]) + 1e-9  # the analytic KL bounds the discrete one
        if n == 1:  # best of 1 = a random sample: the pool's mean, Δ = 0
            assert float(r["gold_delta"]) == pytest.approx(0.0, abs=1e-9)
            assert float(r["proxy_delta"]) == pytest.approx(0.0, abs=1e-6)
    for r in ppo:
        if int(r["point"]) == 0:
            assert float(r["d"]) == 0.0 and float(r["gold_delta"]) == 0.0
        else:
            assert int(r["samples"]) > 0 and r["steps"]
            assert float(r["d"]) == pytest.approx(math.sqrt(max(float(r["kl"]), 0.0)), abs=1e-9)
    with open(wd / "results.json") as f:
        res = json.load(f)
    assert res["seconds"] > 0 and res["command"].startswith("python")
    assert {(f["method"], f["rm_pairs"]) for f in res["fits"]} == \
        {("bon", n) for n in RM_PAIRS} | {("ppo", n) for n in PPO_PAIRS}
    for f in res["fits"]:
        assert all(math.isfinite(f[k][0]) for k in ("alpha", "beta"))
    md = (wd / "results.md").read_text()
    assert "## Fitted functional forms" in md and "## Answers" in md
    import matplotlib.image

    img = matplotlib.image.imread(str(wd / "results.png"))
    assert img.ndim == 3 and img.shape[1] > 800 and img.shape[0] > 300


def test_reward_models_train_on_the_first_n_pairs(out):
    wd, _, _ = out
    clean = _read_jsonl(wd / "toy_data" / "pairs_soft.jsonl")
    for n in RM_PAIRS:
        assert _read_jsonl(wd / "subsets" / f"pairs_soft_n{n}.jsonl") == clean[:n]
        for s in SEEDS:
            with open(wd / "runs" / f"rm_n{n}_seed{s}" / "config.json") as f:
                cfg = json.load(f)
            assert cfg["data"]["train"].endswith(f"pairs_soft_n{n}.jsonl") and cfg["seed"] == s


def test_rerun_trains_nothing(out):
    wd, rows, first_log = out
    assert "training a reward model" in first_log and "PPO against the proxy" in first_log
    log = _run(wd)
    assert "training a reward model" not in log and "PPO against the proxy" not in log and "] training " not in log
    assert "already done" in log
    with open(wd / "runs.csv", newline="") as f:
        again = list(csv.DictReader(f))
    assert again == rows


# ---------------------------------------------------------------------------------------------- pure helpers


def test_best_of_n_estimator_equals_brute_force_over_subsets(oo):
    rng = np.random.default_rng(0)
    P, N = 3, 7
    proxy = rng.normal(size=(P, N))
    proxy[0, 3] = proxy[0, 5]  # a tie (the same completion twice): same gold too
    gold = rng.normal(size=(P, N))
    gold[0, 3] = gold[0, 5]
    for n in range(1, N + 1):
        w = oo.bon_weights(N, n)
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
        g_bf, p_bf = [], []
        for i in range(P):
            subsets = list(itertools.combinations(range(N), n))
            best = [max(s, key=lambda j: proxy[i, j]) for s in subsets]
            g_bf.append(np.mean([gold[i, j] for j in best]))
            p_bf.append(np.mean([proxy[i, j] for j in best]))
        g, p = oo.bon_estimate(proxy, gold, n)
        assert g == pytest.approx(np.mean(g_bf), abs=1e-12) and p == pytest.approx(np.mean(p_bf), abs=1e-12)
    assert oo.bon_estimate(proxy, gold, 1)[0] == pytest.approx(gold.mean())
    assert oo.bon_estimate(proxy, gold, N)[1] == pytest.approx(proxy.max(1).mean())
    with pytest.raises(ValueError):
        oo.bon_weights(4, 5)


def test_kl_of_best_of_n(oo):
    assert oo.kl_bon(1) == 0.0
    assert oo.kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    np.testing.assert_allclose(oo.kl_bon([4, 64]), [math.log(4) - 0.75, math.log(64) - 63 / 64])
    # two equally likely outcomes, n = 2: P_bon = (1/4, 3/4), KL = 1/4 log(1/2) + 3/4 log(3/2)
    assert oo.kl_bon_pool([[0.0, 1.0]], 2) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # ties are one outcome: a pool of one repeated answer gives KL 0 for any n
    assert oo.kl_bon_pool([[3.0, 3.0, 3.0, 3.0]], 4) == pytest.approx(0.0, abs=1e-12)
    # all distinct and many: the analytic value (from below)
    big = np.arange(20000, dtype=np.float64)[None]
    for n in (2, 8, 32):
        v = oo.kl_bon_pool(big, n)
        assert v <= oo.kl_bon(n) + 1e-12 and v == pytest.approx(oo.kl_bon(n), abs=2e-3)


def test_fits_recover_known_coefficients(oo):
    d = np.sqrt(oo.kl_bon(np.array([1, 2, 4, 8, 16, 32, 64])))
    a, b = oo.fit_bon(d, d * (0.9 - 0.35 * d))
    assert (a, b) == (pytest.approx(0.9, abs=1e-10), pytest.approx(0.35, abs=1e-10))
    dr = np.array([0.0, 0.3, 0.7, 1.2, 1.8, 2.5])
    a, b = oo.fit_rl(dr, oo.rl_form(dr, 0.6, 0.4))  # d = 0 is left out (d log d -> 0)
    assert (a, b) == (pytest.approx(0.6, abs=1e-10), pytest.approx(0.4, abs=1e-10))
    # with noise: close, and the least-squares solution (normal equations) exactly
    rng = np.random.default_rng(1)
    dd = np.linspace(0.1, 2.0, 40)
    r = dd * (0.8 - 0.3 * dd) + rng.normal(0, 0.01, dd.size)
    a, b = oo.fit_bon(dd, r)
    assert abs(a - 0.8) < 0.03 and abs(b - 0.3) < 0.03
    X = np.stack([dd, -dd * dd], 1)
    np.testing.assert_allclose(np.linalg.solve(X.T @ X, X.T @ r), [a, b], rtol=1e-9)
    r = oo.rl_form(dd, 0.5, 0.25) + rng.normal(0, 0.01, dd.size)
    a, b = oo.fit_rl(dd, r)
    assert abs(a - 0.5) < 0.03 and abs(b - 0.25) < 0.03
    # peaks: bon d* = α/2β with R = α²/4β; RL d* = exp(α/β − 1) with R = β d*
    assert oo.peak("bon", 0.9, 0.3) == (pytest.approx(1.5), pytest.approx(0.9 ** 2 / 1.2))
    dstar, rstar = oo.peak("rl", 0.5, 0.25)
    assert dstar == pytest.approx(math.e) and rstar == pytest.approx(0.25 * math.e)
    assert oo.peak("bon", 0.5, -0.1) == (math.inf, math.inf)


def test_windows_average_rollouts(oo):
    ro = [{"step": 1 + 4 * i, "kl": float(i), "proxy": 10.0 + i, "gold": float(i % 2), "samples": 2 + i % 2}
          for i in range(5)]
    w = oo.windows(ro, 2)  # 3 + 2 rollouts
    assert [x["steps"] for x in w] == [(1, 9), (13, 17)]
    assert w[0]["kl"] == pytest.approx(1.0) and w[1]["kl"] == pytest.approx(3.5)
    assert w[0]["gold"] == pytest.approx((0 * 2 + 1 * 3 + 0 * 2) / 7) and w[0]["samples"] == 7
    assert w[1]["proxy"] == pytest.approx((13 * 3 + 14 * 2) / 5)
