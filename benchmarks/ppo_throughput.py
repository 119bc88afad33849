"""Online PPO steps per second: align-jax's training loop vs TRL's PPOTrainer, same models, prompts and settings.

    python benchmarks/ppo_throughput.py                    # 3 timed rollouts after 2 warm-up, each side
    python benchmarks/ppo_throughput.py --sides jax        # align-jax only (no torch / trl needed)

TRL 1.x no longer ships a PPO trainer; the last one is `trl.experimental.ppo.PPOTrainer` of TRL 0.29.1, so the TRL
side needs an environment of its own (it runs with this repository's transformers):

    python3.11 -m venv /tmp/trlenv && /tmp/trlenv/bin/pip install torch trl==0.29.1 accelerate datasets
    python benchmarks/ppo_throughput.py --trl-python /tmp/trlenv/bin/python

Both sides, each in its own fresh process, one after the other:
* policy: the random Llama of `benchmarks/grpo_throughput.py` (hidden 256, 4 layers, the toy tokenizer's 256-word
  vocabulary, fp32); reward model and value model: one random `LlamaForSequenceClassification` of the same shape
  (`num_labels=1`; the value model starts as a copy of the reward model, TRL's usual set-up and align-jax's
  `ppo.value_model="reward_model"`);
* prompts: the embedded toy task's prompts (`toy:prompts`, chat template), in file order, left-padded;
* rollout: `--prompts` prompts, one completion each of `--new` tokens at most, temperature 0.7 (both defaults),
  stopping at EOS; per-token KL penalty 0.05 (k1), GAE gamma 1 / lambda 0.95, no reward whitening;
* update: one PPO epoch of one minibatch per rollout (one optimizer step), clip 0.2 / value clip 0.2, vf_coef 0.1,
  AdamW lr 1e-5 constant, no gradient clipping (TRL's PPOTrainer never clips).

Timed: each rollout + update after `--warmup` untimed ones (align-jax compiles there), split into generation, the
rollout's forward passes (reward model, value model, pi_old and pi_ref log-probs: one jitted call in align-jax) and
the rest (update: forward + backward + AdamW, plus each loop's own bookkeeping). align-jax's split is its own
metrics (`step_seconds`, `timing/*` in metrics.jsonl); TRL's is measured by wrapping the module-level
`batch_generation`, `get_reward` and `forward` functions of `trl.experimental.ppo.ppo_trainer` (the calls made
with gradients off count as the rollout's), with the step boundaries from a `TrainerCallback`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from grpo_throughput import MODEL  # noqa: E402  (the same policy shape)
from align_jax.hostinfo import host_line  # noqa: E402

LR = 1e-5
PARTS = ("generation", "forwards", "update")


def build(workdir: str) -> dict:
    """policy and reward-model directories (random init + the toy tokenizer), the toy prompts; parameter counts."""
    from align_jax.data.toy import TOKENIZER_DIR
    from align_jax.data.toy import generate as generate_toy

    hf = {k: v for k, v in MODEL.items() if k not in ("architectures", "model_type")}
    n = {}
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

        torch.manual_seed(0)
        for name, cls, extra in (("model", LlamaForCausalLM, {}), ("rm", LlamaForSequenceClassification,
                                                                   {"num_labels": 1})):
            m = cls(LlamaConfig(**hf, **extra)).float()
            m.save_pretrained(os.path.join(workdir, name), safe_serialization=True)
            n[name] = sum(p.numel() for p in m.parameters())
    except ImportError:  # align-jax alone: its own writers of the same two formats
        import jax
        from flax import nnx

        from align_jax.models import from_hf_config, init_model, save_pretrained, save_reward_model
        from align_jax.models.heads import ScalarHeadModel

        m = init_model(from_hf_config(MODEL), seed=0)
        save_pretrained(m, os.path.join(workdir, "model"))
        rm = ScalarHeadModel(from_hf_config(MODEL), rngs=nnx.Rngs(1))
        save_reward_model(rm, os.path.join(workdir, "rm"), pad_token_id=MODEL["pad_token_id"])
        n = {k: sum(x.size for x in jax.tree.leaves(nnx.state(v, nnx.Param))) for k, v in (("model", m), ("rm", rm))}
    for name in ("model", "rm"):
        for f in os.listdir(TOKENIZER_DIR):
            shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(workdir, name, f))
    generate_toy(os.path.join(workdir, "toy"), seed=0)
    return {k: int(v) for k, v in n.items()}


def run_jax(workdir: str, a) -> dict:
    import jax

    from align_jax.cli import load_config_file
    from bench_util import train_timed_steps

    c = load_config_file(str(ROOT / "configs" / "ppo.py"))
    n = a.warmup + a.steps
    c.model.init_from = os.path.join(workdir, "model")
    c.ppo.reward_model = os.path.join(workdir, "rm")
    c.ppo.value_model = "reward_model"
    c.data.toy_dir = os.path.join(workdir, "toy")
    c.data.data_dir = os.path.join(workdir, "tfds")
    c.batch_size = a.prompts
    c.ppo.num_ppo_epochs, c.ppo.num_mini_batches = 1, 1
    c.ppo.response_length = a.new
    c.ppo.temperature, c.ppo.kl_coef = 0.7, 0.05
    c.ppo.log_completions_every = 10 ** 6
    c.optimizer.learning_rate, c.optimizer.schedule, c.optimizer.warmup_steps = LR, "constant", 0
    c.optimizer.max_grad_norm = 0.0
    c.total_steps = n
    c.checkpoint.every_steps = n
    c.eval_generation = 0
    c.export = False
    c.progress_bar = False
    rows, total = train_timed_steps(c, os.path.join(workdir, "jax_run"), a.warmup, a.steps)
    steps = []
    for r in rows:
        gen = r.get("timing/sampling_seconds", 0.0)
        fwd = r.get("timing/scoring_seconds", 0.0) + r.get("timing/logps_seconds", 0.0)
        steps.append({"seconds": r["step_seconds"], "generation": gen, "forwards": fwd,
                      "update": r["step_seconds"] - gen - fwd, "score": r.get("objective/scores")})
    return {"side": "align-jax", "steps": steps, "total_seconds": total, "jax": jax.__version__,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}


def run_trl(workdir: str, a) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as mod

    n = a.warmup + a.steps
    parts = {p: 0.0 for p in PARTS}
    marks, last = [], [0.0]

    def timed(fn, part):
        def call(*args, **kw):
            name = part if part == "generation" or not torch.is_grad_enabled() else None
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if name:
                    parts[name] += time.perf_counter() - t
        return call

    mod.batch_generation = timed(mod.batch_generation, "generation")
    mod.get_reward = timed(mod.get_reward, "forwards")
    mod.forward = timed(mod.forward, "forwards")

    class Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            marks.append({"seconds": now - last[0], **parts})
            last[0] = now
            for p in PARTS:
                parts[p] = 0.0

    tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "model"), padding_side="left")
    prompts = [json.loads(x)["prompt"] for x in open(os.path.join(workdir, "toy", "prompts.jsonl"))][:n * a.prompts]
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "model"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "model"), dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(workdir, "rm"), num_labels=1,
                                                            dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(os.path.join(workdir, "rm"), num_labels=1,
                                                               dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(output_dir=tmp, per_device_train_batch_size=a.prompts, gradient_accumulation_steps=1,
                         num_ppo_epochs=1, num_mini_batches=1, total_episodes=n * a.prompts,
                         local_rollout_forward_batch_size=a.prompts, response_length=a.new, stop_token="eos",
                         temperature=0.7, kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2,
                         vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False, missing_eos_penalty=None,
                         learning_rate=LR, lr_scheduler_type="constant", num_sample_generations=0,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
                         disable_tqdm=True)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             value_model=value, train_dataset=dataset, callbacks=[Steps()])
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    assert len(marks) == n, len(marks)
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    steps = []
    for i, m in enumerate(marks[a.warmup:]):
        m = dict(m)
        m["update"] = m["seconds"] - m["generation"] - m["forwards"]
        m["score"] = logs[a.warmup + i]["objective/scores"] if len(logs) > a.warmup + i else None
        steps.append(m)
    return {"side": "TRL", "steps": steps, "total_seconds": total, "torch_threads": torch.get_num_threads(),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "trl": trl.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def _child(a):
    res = run_jax(a.workdir, a) if a.child == "jax" else run_trl(a.workdir, a)
    res["loadavg_after"] = os.getloadavg()
    print("RESULT " + json.dumps(res))


def _spawn(side, a) -> dict:
    from bench_util import run_child

    python = a.trl_python if side == "trl" and a.trl_python else sys.executable
    return run_child([python, __file__, "--child", side, "--workdir", a.workdir] + [
        f"--{k}={getattr(a, k)}" for k in ("prompts", "new", "steps", "warmup")], side)


def main():
    from bench_util import at_least, comma_choices

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="jax,trl", type=comma_choices("jax", "trl"), help="comma-separated: jax, trl")
    ap.add_argument("--trl-python", default="", help="the Python of an environment with trl==0.29.1 (TRL side)")
    ap.add_argument("--prompts", type=at_least(1), default=16, help="prompts per rollout (one completion each)")
    ap.add_argument("--new", type=at_least(1), default=32, help="max new tokens per completion")
    ap.add_argument("--steps", type=at_least(1), default=3, help="timed rollouts (one optimizer step each)")
    ap.add_argument("--warmup", type=at_least(1), default=2, help="untimed rollouts first (align-jax compiles here)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(a)
    sides = a.sides
    print(host_line())
    print(f"{a.prompts} prompts x 1 "
          f"completion, <= {a.new} new tokens, {a.warmup} warm-up + {a.steps} timed rollouts")
    res = {}
    with tempfile.TemporaryDirectory() as wd:
        a.workdir = wd
        n = build(wd)
        print(f"policy {n['model'] / 1e6:.2f}M params, reward / value model {n['rm'] / 1e6:.2f}M params")
        for side in sides:
            r = res[side] = _spawn(side, a)
            med = r["median"] = {p: statistics.median(s[p] for s in r["steps"]) for p in ("seconds",) + PARTS}
            extra = (f"torch {r['torch']} ({r['torch_threads']} threads), trl {r['trl']}, gradient checkpointing "
                     f"{r['gradient_checkpointing']}" if side == "trl" else f"jax {r['jax']}, {r['devices']}")
            print(f"{r['side']:>9}: median step {med['seconds']:.3f} s = generation {med['generation']:.3f} + "
                  f"reward/value/log-prob forwards {med['forwards']:.3f} + update {med['update']:.3f}; steps "
                  f"{[round(s['seconds'], 3) for s in r['steps']]}; load {r['loadavg_before'][0]:.2f} -> "
                  f"{r['loadavg_after'][0]:.2f}; {extra}", flush=True)
    if "jax" in res and "trl" in res:
        j, t = res["jax"]["median"], res["trl"]["median"]
        print("\n| side | step s | generation s | reward/value/log-prob forwards s | update s | speed-up |")
        print("|---|---|---|---|---|---|")
        for name, m in (("align-jax", j), ("TRL", t)):
            ratio = f"**{t['seconds'] / j['seconds']:.2f}x**" if name == "align-jax" else ""
            print(f"| {name} | {m['seconds']:.3f} | {m['generation']:.3f} | {m['forwards']:.3f} | {m['update']:.3f} "
                  f"| {ratio} |")
        print(f"\nalign-jax / TRL steps per second = {t['seconds'] / j['seconds']:.2f}x; issue 16's target >= 3x: "
              f"{'met' if t['seconds'] / j['seconds'] >= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
