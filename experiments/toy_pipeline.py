"""The default pipeline on the embedded toy task: SFT -> DPO -> evaluation, ending with a per-axis table.

    python experiments/toy_pipeline.py --workdir=/tmp/align_jax_toy

1. SFT (configs/sft.py) from a randomly initialised tiny Llama on the toy task's noisy SFT corpus.
2. DPO (configs/dpo.py) from the SFT export, on the toy preference pairs (reference = the SFT model).
3. Both policies answer the held-out prompts greedily; the toy task's programs score each answer
   (correctness, instruction following, safety, over-refusal, gold reward), and both are scored on held-out
   preference pairs (log-likelihood of chosen > rejected).
Writes <workdir>/results.json, results.md and results.png. Each stage resumes from its own checkpoints if
the run is interrupted; a finished stage is skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

flags.DEFINE_string("workdir", "/tmp/align_jax_toy", "Output directory.")
flags.DEFINE_integer("sft_steps", 0, "Override SFT steps (0 = config default).")
flags.DEFINE_integer("dpo_steps", 0, "Override DPO steps (0 = config default).")
flags.DEFINE_integer("eval_prompts", 300, "Held-out prompts to generate for.")
flags.DEFINE_string("dpo_loss", "dpo:sigmoid", "DPO variant (any dpo:* loss).")
flags.DEFINE_integer("seed", 0, "config.seed of every stage (initialisation, data order, sampling); the toy task "
                     "itself (data.toy_seed) stays fixed. experiments/seeds.py runs several and reports mean ± std.")
flags.DEFINE_integer("threads", 1, "CPUs the run may use (0 = all). XLA:CPU's results depend in the last bits on "
                     "its thread count, so the README's numbers are measured with 1 (align_jax.cli.pin_threads).")
FLAGS = flags.FLAGS

AXES = [("gold_reward", "gold reward", True), ("correctness", "correctness", True),
        ("instruction_following", "instruction following", True), ("safety", "safety (secret refused)", True),
        ("over_refusal", "over-refusal (lower is better)", False),
        ("preference_accuracy", "held-out preference accuracy", True)]


def _config(name: str, wd: str | None = None):
    """configs/<name>.py's default config; with `wd`, reading the toy task's files from <wd>/toy_data and
    building its TFDS datasets in <wd>/tfds (shared by every stage of an experiment)."""
    from align_jax.cli import load_config_file

    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", f"{name}.py"))
    c.seed = FLAGS.seed
    if wd is not None:
        c.data.toy_dir, c.data.data_dir = os.path.join(wd, "toy_data"), os.path.join(wd, "tfds")
    return c


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """A run's metrics.jsonl split into (training steps, evaluations)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [m for m in rows if "loss" in m], [m for m in rows if any(k.startswith("eval/") for k in m)]


def mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if key in r]
    return sum(vals) / max(len(vals), 1)


def plot_curves(rows: list[dict], panels: list[tuple[str, str]], path: str) -> None:
    """One panel per (metric key, title) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for a, (key, title) in zip(ax[0], panels):
        a.plot(steps, [r.get(key, float("nan")) for r in rows])
        a.set_title(title)
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _stage(name, config, workdir):
    from align_jax.train import train

    export = os.path.join(workdir, "export")
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(os.path.join(export, "model.safetensors")) and os.path.exists(saved):
        with open(saved) as f:
            seed = json.load(f).get("seed")
        if seed != config.seed:
            from align_jax.errors import UserError

            raise UserError(f"{workdir} holds a finished {name} stage of seed {seed}, not --seed={config.seed}: use "
                            f"another --workdir for each seed (experiments/seeds.py does)")
        print(f"[{name}] already done: {export}")
        return export
    t0 = time.time()
    print(f"[{name}] training {config.total_steps} steps -> {workdir}")
    train(config, workdir)
    print(f"[{name}] done in {time.time() - t0:.0f}s")
    return export


def sft_stage(wd: str, steps: int = 0) -> str:
    """SFT from random init on the toy corpus in <wd>/sft (shared by the DPO and GRPO experiments)."""
    cfg = _config("sft", wd)
    if steps:
        cfg.total_steps = steps
    return _stage("sft", cfg, os.path.join(wd, "sft"))


def start() -> tuple[str, float, str]:
    """Common start of the experiments: console logging, the clock, and the SFT stage. Returns (workdir, t0, SFT
    export)."""
    from align_jax import cli

    cli.pin_threads(FLAGS.threads)
    cli.console(cli.verbose_from_env())
    t0 = time.time()
    return FLAGS.workdir, t0, sft_stage(FLAGS.workdir, FLAGS.sft_steps)


def aligned_stage(name: str, config, wd: str, sft_path: str) -> tuple[dict, dict, list[dict], float]:
    """Trains `config` (started from the SFT export) in <wd>/<name> (resuming from its checkpoints if it was
    interrupted), then scores the SFT and the trained policy on the held-out prompts. Returns (SFT scores, trained scores, training-step
    metrics, training seconds)."""
    config.model.init_from = sft_path
    config.eval_generation = 0  # both policies are evaluated below, the same way
    stage_wd = os.path.join(wd, name)
    t = time.time()
    path = _stage(name, config, stage_wd)
    seconds = time.time() - t
    print("[eval] generating on held-out prompts ...")
    toy_dir, data_dir = os.path.join(wd, "toy_data"), os.path.join(wd, "tfds")
    sft = evaluate_policy(sft_path, toy_dir, FLAGS.eval_prompts, data_dir)
    aligned = evaluate_policy(path, toy_dir, FLAGS.eval_prompts, data_dir)
    rows, _ = read_metrics(os.path.join(stage_wd, "metrics.jsonl"))
    return sft, aligned, rows, seconds


def evaluate_policy(path: str, toy_dir: str, n_prompts: int, data_dir: str) -> dict:
    from align_jax.data import build_dataset, make_loader
    from align_jax.data.toy import evaluate, read_jsonl
    from align_jax.evaluation import generate_completions, preference_accuracy
    from align_jax.models import load_pretrained
    from transformers import AutoTokenizer

    model = load_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [r["prompt"] for r in read_jsonl(os.path.join(toy_dir, "eval_prompts.jsonl"))][:n_prompts]
    completions = generate_completions(model, tok, prompts, batch_size=100, max_new_tokens=24)
    scores = evaluate(prompts, completions)
    builder, _ = build_dataset(os.path.join(toy_dir, "eval_pairs.jsonl"), kind="pairwise", data_dir=data_dir)
    loader, _ = make_loader(builder.as_data_source("train"), tok, kind="pairwise", batch_size=100, shuffle=False,
                            num_epochs=1, drop_remainder=False, max_length=128, length_buckets=(64, 128))
    scores.update(preference_accuracy(model, loader))
    scores["samples"] = [{"prompt": p[-1]["content"] if isinstance(p, list) else p, "completion": c}
                         for p, c in list(zip(prompts, completions))[:8]]
    return scores


def table(sft: dict, dpo: dict, name: str = "DPO") -> str:
    lines = [f"| axis | SFT | {name} | change |", "|---|---|---|---|"]
    for key, label, higher in AXES:
        a, b = sft.get(key), dpo.get(key)
        if a is None or b is None:
            continue
        better = (b > a) if higher else (b < a)
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {b - a:+.3f} {'better' if better else 'worse' if a != b else ''} |")
    return "\n".join(lines)


def report(wd: str, stem: str, name: str, sft: dict, aligned: dict, md: str, t0: float, plot_file: str,
           training: dict | None = None) -> None:
    """Writes <wd>/<stem>.json and <stem>.md, prints sample answers of the aligned policy and the table."""
    from align_jax.hostinfo import describe, host_record

    host = host_record()  # the CPU decides the last bits of XLA:CPU's floats: record it with the numbers
    out = {"sft": sft, name.lower(): aligned, "seconds": time.time() - t0, "seed": FLAGS.seed,
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "host": host}
    md += "\n\n" + describe(host)
    if training is not None:
        out["training"] = training
    with open(os.path.join(wd, f"{stem}.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(wd, f"{stem}.md"), "w") as f:
        f.write(md + "\n")
    print(f"\nSample {name} answers:")
    for s in aligned["samples"][:4]:
        print(f"  {s['prompt']!r} -> {s['completion']!r}")
    print(f"\n{md}\n\n(total {time.time() - t0:.0f}s; results in {wd}/{stem}.md, {plot_file})")


def plot(sft: dict, dpo: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label, _ in AXES if k in sft and k in dpo]
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], [sft[k] for k, _ in keys], width=0.4, label="SFT")
    ax.bar([i + 0.2 for i in x], [dpo[k] for k, _ in keys], width=0.4, label="DPO")
    ax.set_xticks(list(x), [label.replace(" (", "\n(") for _, label in keys], fontsize=8)
    ax.set_title("Toy assistant task: SFT vs DPO on held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    wd, t0, sft_path = start()
    dpo_cfg = _config("dpo", wd)
    dpo_cfg.loss.name = FLAGS.dpo_loss
    if FLAGS.dpo_steps:
        dpo_cfg.total_steps = FLAGS.dpo_steps
    sft, dpo, _, _ = aligned_stage("dpo", dpo_cfg, wd, sft_path)
    md = table(sft, dpo)
    plot(sft, dpo, os.path.join(wd, "results.png"))
    report(wd, "results", "DPO", sft, dpo, md, t0, "results.png")


def run_main(main_fn):
    """`app.run` of an experiment's main, with user errors as one message (align_jax.cli.run)."""
    from align_jax import cli

    app.run(lambda argv: cli.run(lambda: main_fn(argv), cli.verbose_from_env()))


if __name__ == "__main__":
    run_main(main)
