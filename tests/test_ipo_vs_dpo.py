"""experiments/ipo_vs_dpo.py at --size=tiny: DPO empties the dispreferred actions for every β while IPO lands on its
closed-form optimum, which depends on τ; and the outputs (csv, md, json, png) exist and parse."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT

BETAS = (0.1, 0.5, 1.0, 2.0)  # the script's default sweep, which --size=tiny keeps
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ipo_vs_dpo")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "ipo_vs_dpo.py"), f"--workdir={wd}",
                        "--size=tiny"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(wd / "results.json") as f:
        results = json.load(f)
    with open(wd / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return wd, results, rows


def analytic_ipo(dataset: str, tau: float) -> np.ndarray:
    """IPO's optimum derived by hand (uniform reference): equal log-gaps log π(y1)/π(y2) = log π(y2)/π(y3) = g with
    g = 1/(2τ) when only the adjacent pairs are observed (both targets met exactly) and g = 1/(3τ) when y1 ≻ y3 is
    observed too (least squares of (u − c)² + (v − c)² + (u + v − c)², c = 1/(2τ): u = v = 2c/3)."""
    g = 1 / (2 * tau) if dataset == "chain" else 1 / (3 * tau)
    e = np.exp([2 * g, g, 0.0])
    return e / e.sum()


def runs(results, method, dataset):
    return {r["beta"]: r for r in results["runs"] if r["method"] == method and r["dataset"] == dataset}


@pytest.mark.parametrize("dataset", ["full", "chain"])
def test_dpo_drives_dispreferred_actions_to_zero_for_every_beta(out, dataset):
    _, results, rows = out
    dpo = runs(results, "DPO", dataset)
    assert sorted(dpo) == list(BETAS)
    for beta, r in dpo.items():
        final = np.array(r["final_probs"])  # [seeds, 3]
        assert final.shape == (len(SEEDS), 3)
        assert np.all(final[:, 0] > 0.9), (beta, final)
        assert np.all(final[:, 1] < 0.1), (beta, final)  # IPO keeps 0.33 here at τ = 2
        assert np.all(final[:, 2] < 0.01), (beta, final)
        assert r["dispreferred_still_falling"], beta
    # no finite optimum: the dispreferred probabilities keep falling to the last step, for every β and seed
    steps = sorted({int(x["step"]) for x in rows})
    half = min(steps, key=lambda s: abs(s - steps[-1] / 2))
    for beta in BETAS:
        for seed in SEEDS:
            sel = {int(x["step"]): x for x in rows if x["method"] == "DPO" and x["dataset"] == dataset
                   and float(x["beta"]) == beta and int(x["seed"]) == seed}
            for col in ("p_y2", "p_y3"):
                assert float(sel[steps[-1]][col]) < float(sel[half][col]), (beta, seed, col)


@pytest.mark.parametrize("dataset", ["full", "chain"])
def test_ipo_reaches_its_closed_form_which_depends_on_tau(out, dataset):
    _, results, _ = out
    ipo = runs(results, "IPO", dataset)
    assert sorted(ipo) == list(BETAS)
    finals = {}
    for tau, r in ipo.items():
        want = analytic_ipo(dataset, tau)
        np.testing.assert_allclose(r["closed_form"], want, atol=1e-12)  # the script's least squares = by hand
        final = np.array(r["final_probs"])
        np.testing.assert_allclose(final, np.broadcast_to(want, final.shape), atol=1e-5, rtol=0)
        assert r["max_abs_error"] < 1e-5
        finals[tau] = final.mean(0)
    if dataset == "full":  # with every pair observed, the fit is the population optimum of ΨPO (Ψ = identity)
        for r in ipo.values():
            np.testing.assert_allclose(r["population_optimum"], r["closed_form"], atol=1e-12)
    taus = sorted(finals)
    for a, b in zip(taus, taus[1:]):  # larger τ: closer to the (uniform) reference
        assert np.abs(finals[a] - finals[b]).max() > 0.03, (a, b, finals)
        assert finals[a][0] > finals[b][0] and finals[a][2] < finals[b][2]
    # and unlike DPO, IPO keeps real mass on the dispreferred actions at large τ
    assert finals[2.0][1] > 0.3 and finals[2.0][2] > 0.2


def test_outputs_exist_and_parse(out):
    wd, results, rows = out
    for name in ("runs.csv", "results.md", "results.json", "results.png"):
        assert (wd / name).stat().st_size > 0, name
    # csv: every (method, dataset, beta, seed) at the same recorded steps, from step 0 to the last, probabilities
    # summing to 1, starting near the uniform reference
    assert list(rows[0]) == ["method", "loss", "dataset", "beta", "seed", "step", "p_y1", "p_y2", "p_y3"]
    keys = {(x["method"], x["dataset"], float(x["beta"]), int(x["seed"])) for x in rows}
    assert keys == {(m, d, b, s) for m in ("DPO", "IPO") for d in ("full", "chain") for b in BETAS for s in SEEDS}
    steps = sorted({int(x["step"]) for x in rows})
    assert steps[0] == 0 and steps[-1] == results["config"]["steps"] and len(rows) == len(keys) * len(steps)
    assert {x["loss"] for x in rows if x["method"] == "IPO"} == {"dpo:ipo"}
    assert {x["loss"] for x in rows if x["method"] == "DPO"} == {"dpo:sigmoid"}
    for x in rows:
        p = [float(x[c]) for c in ("p_y1", "p_y2", "p_y3")]
        assert all(0.0 <= v <= 1.0 for v in p) and math.isclose(sum(p), 1.0, abs_tol=1e-5), x
        if x["step"] == "0":
            assert max(abs(v - 1 / 3) for v in p) < 0.15, x
    # md: one table row per (dataset, method, β): measured mean ± std, and for IPO the closed form next to it
    md = (wd / "results.md").read_text()
    dataset, n_rows = None, 0
    for line in md.splitlines():
        if line.startswith("## dataset `"):
            dataset = line.split("`")[1]
        if not (line.startswith("| DPO |") or line.startswith("| IPO |")):
            continue
        n_rows += 1
        cells = [c.strip() for c in line.strip("|").split("|")]
        method, beta = cells[0], float(cells[1])
        measured = [float(c.split("±")[0]) for c in cells[2:5]]
        assert math.isclose(sum(measured), 1.0, abs_tol=2e-4), line
        if method == "IPO":
            closed = [float(v) for v in cells[5].strip("()").split(",")]
            np.testing.assert_allclose(closed, analytic_ipo(dataset, beta), rtol=1e-2, atol=5e-5)
            np.testing.assert_allclose(measured, closed, rtol=1e-2, atol=5e-5)
    assert n_rows == 2 * 2 * len(BETAS)
    # png: an image matplotlib reads back
    import matplotlib.image

    img = matplotlib.image.imread(str(wd / "results.png"))
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 400
    assert results["seconds"] > 0 and len(results["runs"]) == 2 * 2 * len(BETAS)
