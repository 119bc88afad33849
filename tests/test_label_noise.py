"""experiments/label_noise.py at --size=tiny end to end (outputs exist and parse; the noisy training files flip exactly
round(ε·n) pairs, deterministically in the seed, the soft labels on the same pairs; a rerun trains nothing), and its
pure helpers on hand-made inputs (flips, aggregation over seeds, the ORPO verdict)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT, load_experiment

METHODS, EPS, SEEDS, N_TRAIN, N_EVAL = ("DPO", "ORPO"), (0.0, 0.4), (0, 1), 200, 32  # the tiny size




@pytest.fixture(scope="module")
def ln():
    return load_experiment("label_noise")


def _run(wd):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))  # one CPU device
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "label_noise.py"), f"--workdir={wd}",
                        "--size=tiny"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    wd = tmp_path_factory.mktemp("label_noise")
    log = _run(wd)
    with open(wd / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return wd, rows, log


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_outputs_exist_and_parse(out, ln):
    wd, rows, log = out
    for name in ("runs.csv", "results.md", "results.json", "results.png"):
        assert (wd / name).stat().st_size > 0, name
    assert list(rows[0]) == ln.CSV_FIELDS
    assert {(r["method"], float(r["eps"]), int(r["seed"])) for r in rows} == \
        {(m, e, s) for m in METHODS for e in EPS for s in SEEDS}
    assert len(rows) == len(METHODS) * len(EPS) * len(SEEDS)
    for r in rows:
        gold = float(r["gold_reward"])
        assert -1.0 <= gold <= 1.5, r
        for k in ("preference_accuracy", "implicit_accuracy", "loglik_accuracy"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r)
        # ORPO has no reference: its accuracy is the log-likelihood one; the DPO family's the implicit reward's
        kind = "loglik" if r["method"] == "ORPO" else "implicit"
        assert r["accuracy_kind"] == kind and float(r["preference_accuracy"]) == float(r[f"{kind}_accuracy"]), r
        assert math.isfinite(float(r["final_loss"])) and float(r["seconds"]) > 0, r
        assert int(r["flipped"]) == round(float(r["eps"]) * N_TRAIN), r
        assert r["run"] == f"{r['method']}_eps{float(r['eps']):g}_seed{r['seed']}", r
    with open(wd / "results.json") as f:
        res = json.load(f)
    assert res["seconds"] > 0 and len(res["cells"]) == len(METHODS) * len(EPS)
    # results.md: per metric a table row per method with mean ± std in every ε column, equal to the csv's numbers
    md = (wd / "results.md").read_text()
    assert "**Does ORPO's claimed robustness to label noise hold?" in md
    tables = md.split("## ")[1:3]
    for table, key in zip(tables, ("gold_reward", "preference_accuracy")):
        for m in METHODS:
            line = next(x for x in table.splitlines() if x.startswith(f"| {m} |"))
            cells = [c.strip() for c in line.strip("|").split("|")[1:]]
            assert len(cells) == len(EPS)
            for e, cell in zip(EPS, cells):
                mean, std = (float(v) for v in cell.split("±"))
                vals = [float(r[key]) for r in rows if r["method"] == m and float(r["eps"]) == e]
                assert mean == pytest.approx(np.mean(vals), abs=6e-4), (m, e, cell)
                assert std == pytest.approx(np.std(vals, ddof=1), abs=6e-4), (m, e, cell)
    import matplotlib.image

    img = matplotlib.image.imread(str(wd / "results.png"))
    assert img.ndim == 3 and img.shape[1] > 800 and img.shape[0] > 300


def test_noisy_files_flip_exactly_round_eps_n_pairs_deterministically(out, ln):
    wd, _, _ = out
    clean = _read_jsonl(wd / "toy_data" / "pairs.jsonl")[:N_TRAIN]
    clean_soft = _read_jsonl(wd / "toy_data" / "pairs_soft.jsonl")[:N_TRAIN]
    flipped = {}
    for eps in EPS:
        for seed in SEEDS:
            hard = _read_jsonl(wd / "noisy" / f"pairs_eps{eps:g}_seed{seed}.jsonl")
            soft = _read_jsonl(wd / "noisy" / f"pairs_soft_eps{eps:g}_seed{seed}.jsonl")
            assert len(hard) == len(soft) == N_TRAIN
            idx = set()
            for i, (c, h) in enumerate(zip(clean, hard)):
                assert h["prompt"] == c["prompt"] and "chosen_prob" not in h
                if h["chosen"] == c["chosen"]:
                    assert h["rejected"] == c["rejected"]
                else:
                    assert (h["chosen"], h["rejected"]) == (c["rejected"], c["chosen"])
                    idx.add(i)
            assert len(idx) == round(eps * N_TRAIN)  # exactly, not in expectation
            assert sorted(idx) == ln.flip_indices(N_TRAIN, eps, seed).tolist()  # the written file = the seed's draw
            # soft labels: the same pairs get p -> 1 - p, texts unchanged; every other pair is untouched
            for i, (c, s) in enumerate(zip(clean_soft, soft)):
                assert (s["prompt"], s["chosen"], s["rejected"]) == (c["prompt"], c["chosen"], c["rejected"])
                want = 1.0 - c["chosen_prob"] if i in idx else c["chosen_prob"]
                assert s["chosen_prob"] == pytest.approx(want, abs=1e-12), i
            flipped[(eps, seed)] = idx
    assert flipped[(0.4, 0)] != flipped[(0.4, 1)]  # each seed flips other pairs
    # deterministic in (seed, ε): drawn again, the same pairs; a smaller ε flips a subset of a larger one's
    for seed in SEEDS:
        a = ln.flip_indices(N_TRAIN, 0.4, seed)
        np.testing.assert_array_equal(a, ln.flip_indices(N_TRAIN, 0.4, seed))
        assert set(ln.flip_indices(N_TRAIN, 0.2, seed)) <= set(a)


def _children(wd) -> str:
    """What the --jobs children (one per CPU, the default) printed: the cells' runs."""
    return "".join(open(f).read() for f in sorted(wd.glob("jobs_*.log")))


def test_rerun_trains_nothing(out):
    wd, rows, first_log = out
    first_log += _children(wd)
    assert "training dpo:sigmoid" in first_log and "training orpo" in first_log
    log = _run(wd)
    log += _children(wd)  # the rerun's children (their logs are rewritten)
    assert "] training " not in log and "already done" in log  # every run and the SFT stage are read back
    with open(wd / "runs.csv", newline="") as f:
        again = list(csv.DictReader(f))
    assert again == rows


def test_flip_helpers_on_hand_made_pairs(ln):
    for n, eps in ((7, 0.3), (10, 0.25), (2000, 0.1), (5, 0.0), (3, 0.49)):
        idx = ln.flip_indices(n, eps, 3)
        assert len(idx) == round(eps * n) and len(set(idx.tolist())) == len(idx) and all(0 <= i < n for i in idx)
    with pytest.raises(Exception, match="0.5"):
        ln.flip_indices(10, 0.5, 0)
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(4)]
    soft = [dict(p, chosen_prob=0.6 + 0.1 * i) for i, p in enumerate(pairs)]
    hard_out, soft_out = ln.flip_records(pairs, soft, [1, 3])
    assert [(p["chosen"], p["rejected"]) for p in hard_out] == [("c0", "r0"), ("r1", "c1"), ("c2", "r2"), ("r3", "c3")]
    np.testing.assert_allclose([p["chosen_prob"] for p in soft_out], [0.6, 0.3, 0.8, 0.1])
    assert [p["chosen"] for p in soft_out] == ["c0", "c1", "c2", "c3"]
    assert pairs[1]["chosen"] == "c1" and soft[1]["chosen_prob"] == 0.7  # the inputs are not changed
    with pytest.raises(ValueError):
        ln.flip_records(pairs, soft[:3], [0])


def _rows(values):
    """{(method, eps): [per-seed (gold, accuracy)]} -> csv-like rows."""
    return [{"method": m, "eps": e, "seed": s, "gold_reward": g, "preference_accuracy": a}
            for (m, e), per_seed in values.items() for s, (g, a) in enumerate(per_seed)]


def test_aggregate_drop_and_orpo_verdict_on_hand_made_numbers(ln):
    rows = _rows({("DPO", 0.0): [(1.0, 0.9), (1.2, 0.8), (1.1, 0.85)],
                  ("DPO", 0.4): [(0.5, 0.6), (0.6, 0.5), (0.7, 0.55)],
                  ("ORPO", 0.0): [(0.9, 0.7), (1.0, 0.7), (0.95, 0.7)],
                  ("ORPO", 0.4): [(0.85, 0.68), (0.97, 0.69), (0.9, 0.7)]})
    agg = ln.aggregate(rows)
    mean, std, n = agg[("DPO", 0.0)]["gold_reward"]
    assert (mean, n) == (pytest.approx(1.1), 3) and std == pytest.approx(0.1)  # sample std, ddof 1
    d = ln.drop(agg, "DPO", "gold_reward", 0.0, 0.4)  # per seed 0.5, 0.6, 0.4
    assert d[0] == pytest.approx(0.5) and d[1] == pytest.approx(0.1) and d[2] == 3
    assert ln.drop(agg, "DPO", "gold_reward", 0.0, 0.2) is None
    assert ln.compare((0.1, 0.05, 3), (0.5, 0.1, 3)) == "smaller"
    assert ln.compare((0.5, 0.1, 3), (0.1, 0.05, 3)) == "larger"
    assert ln.compare((0.3, 0.15, 3), (0.5, 0.1, 3)) == "indistinguishable"
    text = ln.orpo_answer(agg, (0.0, 0.4), ("DPO", "ORPO"))
    assert "Supported at this size" in text and "ORPO loses +0.043" in text
    assert "smaller than DPO's in 3 of 3 seeds" in text
    assert ln.seeds_where_smaller(agg, "DPO", "ORPO", "gold_reward", 0.0, 0.4) == (0, 3)
    # the same with ORPO losing as much as DPO, within the error bars: inconclusive
    rows2 = [dict(r) for r in rows]
    for r in rows2:
        if r["method"] == "ORPO" and r["eps"] == 0.4:
            r["gold_reward"] -= 0.45 + 0.1 * r["seed"]
            r["preference_accuracy"] -= 0.25 + 0.05 * r["seed"]
    assert "Inconclusive at this size" in ln.orpo_answer(ln.aggregate(rows2), (0.0, 0.4), ("DPO", "ORPO"))
    # ORPO losing clearly more: not supported
    for r in rows2:
        if r["method"] == "ORPO" and r["eps"] == 0.4:
            r["gold_reward"] -= 1.0
            r["preference_accuracy"] -= 0.3
    assert "Not supported" in ln.orpo_answer(ln.aggregate(rows2), (0.0, 0.4), ("DPO", "ORPO"))
    # one seed: no error bar, no verdict
    one = [r for r in rows if r["seed"] == 0]
    assert "Inconclusive: a single seed" in ln.orpo_answer(ln.aggregate(one), (0.0, 0.4), ("DPO", "ORPO"))
    assert ln.orpo_answer(agg, (0.0, 0.4), ("DPO",)).startswith("Not answered")
