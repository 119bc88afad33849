"""Online GRPO steps per second: align-jax's training loop vs TRL's GRPOTrainer, same model, prompts, rewards.

    python benchmarks/grpo_throughput.py                          # beta 0 and 0.04, 3 timed steps after 2 warm-up
    python benchmarks/grpo_throughput.py --betas 0 --steps 5 --sides jax   # align-jax only (no torch / trl needed)

Both sides, each in its own fresh process, one after the other:
* model: a random Llama (hidden 256, 4 layers, 4 heads / 2 kv heads, MLP 688, the toy tokenizer's 256-word
  vocabulary; ~3.5M parameters, fp32) written once as a Hugging Face directory with the toy tokenizer;
* prompts: the embedded toy task's prompts (`toy:prompts`, chat template), in file order;
* rollout: `--prompts` prompts x `--generations` completions of at most `--new` tokens, temperature 1, no top-k /
  top-p; reward: the toy task's gold reward (`toy_gold`, plain Python on the completion text);
* update: loss_type dapo (TRL's default), one optimisation pass per rollout (num_iterations 1), epsilon 0.2,
  AdamW lr 1e-5 constant, gradient clipping at 1.0, the batch = the whole rollout in one step; beta as given
  (> 0: a frozen reference model and the k3 KL term).
Each side otherwise runs at its defaults: TRL generates with transformers `generate` (CPU, no vLLM) and uses
gradient checkpointing (GRPOConfig's default); align-jax samples with its own KV-cache sampler.

Timed: the wall time of each optimizer step after `--warmup` untimed ones (align-jax compiles there), split into
generation, scoring (reward functions), reference / old-policy log-probs and the rest (update: forward + backward +
AdamW, plus each loop's own bookkeeping). align-jax's split is its own metrics (`step_seconds`, `timing/*` in
metrics.jsonl); TRL's is measured by wrapping `GRPOTrainer._generate`, `_calculate_rewards` and the
`_get_per_token_logps_and_entropies` calls made while it prepares a rollout (the reference's and, when needed,
the old policy's), with the step boundaries from a `TrainerCallback`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install
from align_jax.hostinfo import host_line  # noqa: E402

MODEL = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=256,
             intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             hidden_act="silu", max_position_embeddings=128, initializer_range=0.02, rms_norm_eps=1e-5,
             rope_theta=10000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=True, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
LR = 1e-5
PARTS = ("generation", "scoring", "logps", "update")


def build(workdir: str) -> int:
    """The model directory (random init + the toy tokenizer) and the toy prompts; returns the parameter count."""
    import shutil

    from align_jax.data.toy import TOKENIZER_DIR
    from align_jax.data.toy import generate as generate_toy

    out = os.path.join(workdir, "model")
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MODEL.items() if k not in ("architectures",
                                                                                           "model_type")}))
        model.float().save_pretrained(out, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
    except ImportError:
        import jax
        from flax import nnx

        from align_jax.models import from_hf_config, init_model, save_pretrained

        model = init_model(from_hf_config(MODEL), seed=0)
        save_pretrained(model, out)
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for f in os.listdir(TOKENIZER_DIR):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(out, f))
    generate_toy(os.path.join(workdir, "toy"), seed=0)
    return int(n)


def run_jax(workdir: str, a) -> dict:
    import importlib.util

    import jax

    from bench_util import train_timed_steps

    spec = importlib.util.spec_from_file_location("grpo_config", ROOT / "configs" / "grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    n = a.warmup + a.steps
    c.model.init_from = os.path.join(workdir, "model")
    c.data.toy_dir = os.path.join(workdir, "toy")
    c.data.data_dir = os.path.join(workdir, "tfds")
    c.batch_size = a.prompts
    c.grpo.num_generations = a.generations
    c.grpo.max_completion_length = a.new
    c.grpo.log_completions_every = 10 ** 6
    c.loss.name = "grpo"  # dapo
    c.loss.kwargs = {"beta": a.beta, "epsilon": 0.2}
    c.loss.reference_free = a.beta == 0  # TRL keeps no reference model at beta 0 either
    c.optimizer.learning_rate, c.optimizer.schedule, c.optimizer.warmup_steps = LR, "constant", 0
    c.optimizer.max_grad_norm = 1.0
    c.total_steps = n
    c.checkpoint.every_steps = n
    c.eval_generation = 0
    c.export = False
    c.progress_bar = False
    rows, total = train_timed_steps(c, os.path.join(workdir, f"jax_run_{a.beta}"), a.warmup, a.steps)
    steps = []
    for r in rows:
        gen, score, logps = (r.get("timing/sampling_seconds", 0.0), r.get("timing/scoring_seconds", 0.0),
                             r.get("timing/logps_seconds", 0.0))
        steps.append({"seconds": r["step_seconds"], "generation": gen, "scoring": score, "logps": logps,
                      "update": r["step_seconds"] - gen - score - logps, "reward": r.get("reward"),
                      "tokens": r["tokens_per_second"] * r["step_seconds"]})
    return {"side": "align-jax", "steps": steps, "total_seconds": total, "jax": jax.__version__,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}


def run_trl(workdir: str, a) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align_jax.rl.rewards import toy_gold

    model_dir = os.path.join(workdir, "model")
    prompts = [json.loads(x) for x in open(os.path.join(workdir, "toy", "prompts.jsonl"))]
    n = a.warmup + a.steps
    parts = {p: 0.0 for p in PARTS}
    marks = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            for p in PARTS:
                parts[p] = 0.0
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            marks.append({"seconds": time.perf_counter() - self.t, **parts})

    def timed(fn, part, only_in_rollout=False):
        def call(*args, **kw):
            if only_in_rollout and not in_rollout[0]:
                return fn(*args, **kw)
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                parts[part] += time.perf_counter() - t
        return call

    in_rollout = [False]

    def rollout_flag(fn):
        def call(*args, **kw):
            in_rollout[0] = True
            try:
                return fn(*args, **kw)
            finally:
                in_rollout[0] = False
        return call

    def reward(prompts, completions, **kw):
        return toy_gold(prompts, completions)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=a.prompts * a.generations,
                          num_generations=a.generations, max_completion_length=a.new, temperature=1.0,
                          top_p=1.0, top_k=0, beta=a.beta, loss_type="dapo", epsilon=0.2, num_iterations=1,
                          learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=n,
                          logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                          seed=0, disable_tqdm=True, shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list(prompts[:n * a.prompts]), processing_class=tok,
                              callbacks=[Steps()])
        trainer._generate = timed(trainer._generate, "generation")
        trainer._calculate_rewards = timed(trainer._calculate_rewards, "scoring")
        trainer._get_per_token_logps_and_entropies = timed(trainer._get_per_token_logps_and_entropies, "logps",
                                                           only_in_rollout=True)
        trainer._generate_and_score_completions = rollout_flag(trainer._generate_and_score_completions)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    assert len(marks) == n, len(marks)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = []
    for i, m in enumerate(marks[a.warmup:]):
        m = dict(m)
        m["update"] = m["seconds"] - m["generation"] - m["scoring"] - m["logps"]
        m["reward"] = logs[a.warmup + i]["reward"] if len(logs) > a.warmup + i else None
        steps.append(m)
    return {"side": "TRL", "steps": steps, "total_seconds": total, "torch_threads": torch.get_num_threads(),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "trl": trl.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def matmul_peaks() -> dict:
    """fp32 matmul peaks under XLA and, if installed, torch (benchmarks/bench_util.py)."""
    from bench_util import matmul_peak

    out = {"XLA": matmul_peak("xla")}
    try:
        out["torch"] = matmul_peak("torch")
    except ImportError:
        pass
    return out


def _child(a):
    res = run_jax(a.workdir, a) if a.child == "jax" else run_trl(a.workdir, a)
    res["loadavg_after"] = os.getloadavg()
    print("RESULT " + json.dumps(res))


def _spawn(side, beta, a) -> dict:
    from bench_util import run_child

    return run_child([sys.executable, __file__, "--child", side, "--workdir", a.workdir, "--beta", str(beta)] + [
        f"--{k}={getattr(a, k)}" for k in ("prompts", "generations", "new", "steps", "warmup")], side)


def _floats(text):
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers >= 0, e.g. 0,0.04")
    return values


def main():
    from bench_util import at_least, comma_choices

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="jax,trl", type=comma_choices("jax", "trl"), help="comma-separated: jax, trl")
    ap.add_argument("--betas", default="0,0.04", type=_floats, help="comma-separated KL coefficients, each >= 0")
    ap.add_argument("--prompts", type=at_least(1), default=8)
    ap.add_argument("--generations", type=at_least(2), default=8)
    ap.add_argument("--new", type=at_least(1), default=32, help="max new tokens per completion")
    ap.add_argument("--steps", type=at_least(1), default=3, help="timed optimizer steps")
    ap.add_argument("--warmup", type=at_least(1), default=2, help="untimed steps first (align-jax compiles here)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--beta", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(a)
    print(host_line())
    print(f"{a.prompts} prompts x "
          f"{a.generations} completions, <= {a.new} new tokens, {a.warmup} warm-up + {a.steps} timed steps")
    table = []
    peaks = matmul_peaks()
    print("fp32 matmul peak (1024^3, best of 8): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    with tempfile.TemporaryDirectory() as wd:
        a.workdir = wd
        n_params = build(wd)
        print(f"model: {n_params / 1e6:.2f}M params")
        for beta in a.betas:
            res = {}
            for side in a.sides:
                r = res[side] = _spawn(side, beta, a)
                med = {p: statistics.median(s[p] for s in r["steps"]) for p in ("seconds",) + PARTS}
                r["median"] = med
                extra = (f"torch {r['torch']} ({r['torch_threads']} threads), trl {r['trl']}, gradient checkpointing "
                         f"{r['gradient_checkpointing']}" if side == "trl" else f"jax {r['jax']}, {r['devices']}")
                print(f"beta {beta}: {r['side']:>9}: median step {med['seconds']:.3f} s = generation "
                      f"{med['generation']:.3f} + scoring {med['scoring']:.3f} + ref/old log-probs {med['logps']:.3f}"
                      f" + update {med['update']:.3f}; steps {[round(s['seconds'], 3) for s in r['steps']]}; "
                      f"load {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}; {extra}", flush=True)
            if "jax" in res:  # the update's FLOP rate: forward + backward = 6 x params x tokens (TRL's gradient
                # checkpointing adds a forward: 8 x)
                tokens = statistics.median(s["tokens"] for s in res["jax"]["steps"])
                rates = {"align-jax": 6 * n_params * tokens / res["jax"]["median"]["update"]}
                if "trl" in res:
                    rates["TRL"] = ((8 if res["trl"]["gradient_checkpointing"] else 6) * n_params * tokens
                                    / res["trl"]["median"]["update"])
                print(f"beta {beta}: update FLOP rate on {tokens:.0f} tokens per step (6 x params x tokens, TRL with "
                      "gradient checkpointing 8 x): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
            if "jax" in res and "trl" in res:
                j, t = res["jax"]["median"], res["trl"]["median"]
                table.append((beta, j, t))
                print(f"beta {beta}: align-jax / TRL steps per second = {t['seconds'] / j['seconds']:.2f}x "
                      f"(generation {t['generation'] / max(j['generation'], 1e-9):.2f}x, update "
                      f"{t['update'] / max(j['update'], 1e-9):.2f}x); issue 16's target >= 3x: "
                      f"{'met' if t['seconds'] / j['seconds'] >= 3 else 'NOT met'}")
    if table:
        print("\n| beta | side | step s | generation s | scoring s | ref/old log-probs s | update s | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for beta, j, t in table:
            for name, m in (("align-jax", j), ("TRL", t)):
                ratio = f"**{t['seconds'] / j['seconds']:.2f}x**" if name == "align-jax" else ""
                print(f"| {beta:g} | {name} | {m['seconds']:.3f} | {m['generation']:.3f} | {m['scoring']:.3f} | "
                      f"{m['logps']:.3f} | {m['update']:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
