"""The toy experiments over several seeds: each table as mean ± std, so a reader knows which difference is signal.

    python experiments/seeds.py --workdir=/tmp/align_jax_seeds                       # seeds 0,1,2; all three
    python experiments/seeds.py --workdir=/tmp/align_jax_seeds --experiments=toy_pipeline --seeds=0,1,2,3,4

Each seed s runs `python experiments/<name>.py --workdir=<workdir>/seed_<s> --seed=s` for every experiment (in
one process each, in that order; the experiments of one seed share its SFT stage), then reads the
`results*.json` they wrote and writes `<workdir>/seeds.md` and `seeds.json`: per axis the value of every seed,
the mean and the sample standard deviation (ddof = 1) of the SFT model, the aligned model and their difference
(the difference is taken per seed, then averaged). The seed sets `config.seed` of every stage (initialisation,
data order, sampling); the toy task itself (`data.toy_seed` = 0) is the same for all. A finished seed is not
rerun (each stage resumes from its checkpoints or is skipped when done).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import toy_pipeline as tp  # noqa: E402  (AXES; its flags --workdir etc. are defined there; puts the repo on sys.path)
from align_jax.hostinfo import describe  # noqa: E402

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (at least 3 for a standard deviation worth reading).")
flags.DEFINE_list("experiments", ["toy_pipeline", "toy_grpo", "toy_rlhf"], "Experiments to run per seed.")
FLAGS = flags.FLAGS

# experiment -> (results file, key of the aligned model in it, its column name)
RESULTS = {"toy_pipeline": ("results.json", "dpo", "DPO"), "toy_grpo": ("results_grpo.json", "grpo", "GRPO"),
           "toy_rlhf": ("results_ppo.json", "ppo", "PPO")}


def _fmt(values) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def summarize(name: str, runs: dict[int, dict]) -> tuple[str, dict]:
    """Markdown table and JSON summary of one experiment's results over seeds ({seed: results json})."""
    _, key, col = RESULTS[name]
    seeds = sorted(runs)
    lines = [f"| axis | SFT | {col} | change | {col} per seed ({', '.join(map(str, seeds))}) |",
             "|---|---|---|---|---|"]
    out = {}
    for axis, label, _ in tp.AXES:
        if not all(axis in runs[s]["sft"] and axis in runs[s][key] for s in seeds):
            continue
        a = [runs[s]["sft"][axis] for s in seeds]
        b = [runs[s][key][axis] for s in seeds]
        d = [y - x for x, y in zip(a, b)]
        out[axis] = {"sft": a, key: b, "sft_mean": float(np.mean(a)), f"{key}_mean": float(np.mean(b)),
                     "change_mean": float(np.mean(d)),
                     "change_std": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0}
        lines.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {_fmt(d)} | {', '.join(f'{x:.3f}' for x in b)} |")
    secs = [runs[s]["seconds"] for s in seeds]
    lines.append(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean ± sample std (ddof 1); wall time per "
                 f"seed {min(secs):.0f}-{max(secs):.0f} s (includes the shared SFT stage only for the first "
                 f"experiment of a seed).")
    hosts = sorted({describe(h) for h in (runs[s].get("host") for s in seeds) if h})
    if hosts:  # results written before hosts were recorded have none
        lines.append("; ".join(hosts) + (" (results from different hosts differ in the last bits, then more)"
                                         if len(hosts) > 1 else ""))
    return "\n".join(lines), out


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    unknown = [e for e in FLAGS.experiments if e not in RESULTS]
    if unknown:
        sys.exit(f"error: --experiments: unknown {unknown}; choose from {sorted(RESULTS)}")
    t0 = time.time()
    for s in seeds:
        wd = os.path.join(FLAGS.workdir, f"seed_{s}")
        for name in FLAGS.experiments:
            if os.path.exists(os.path.join(wd, RESULTS[name][0])):
                print(f"[seed {s}] {name}: done ({wd})")
                continue
            cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), f"--workdir={wd}", f"--seed={s}"]
            print(f"[seed {s}] {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
    md, summary = [], {}
    for name in FLAGS.experiments:
        runs = {}
        for s in seeds:
            with open(os.path.join(FLAGS.workdir, f"seed_{s}", RESULTS[name][0])) as f:
                runs[s] = json.load(f)
        table, summary[name] = summarize(name, runs)
        md.append(f"### {name}\n\n{table}\n")
    with open(os.path.join(FLAGS.workdir, "seeds.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(FLAGS.workdir, "seeds.json"), "w") as f:
        json.dump({"seeds": seeds, "experiments": summary}, f, indent=2)
    print("\n" + "\n".join(md) + f"\n(total {time.time() - t0:.0f}s; {FLAGS.workdir}/seeds.md)")


if __name__ == "__main__":
    app.run(main)
