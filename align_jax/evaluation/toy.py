"""Generation quality on the embedded toy task: greedy answers to its held-out prompts, scored per axis by the
task's programs (correctness, format, safety, gold reward)."""

from __future__ import annotations

import os

from align_jax.data.toy import evaluate, read_jsonl
from align_jax.evaluation.policy import generate_completions


def toy_generation_eval(config, policy, tokenizer, workdir: str) -> dict:
    """{"eval/gen/<axis>": score} over the first `config.eval_generation` held-out prompts of the toy task
    (`<data.toy_dir or workdir/toy_data>/eval_prompts.jsonl`)."""
    toy_dir = config.data.toy_dir or os.path.join(workdir, "toy_data")
    prompts = [r["prompt"] for r in read_jsonl(os.path.join(toy_dir, "eval_prompts.jsonl"))]
    prompts = prompts[:config.eval_generation]
    completions = generate_completions(policy, tokenizer, prompts, batch_size=min(100, len(prompts)),
                                       max_new_tokens=24)
    scores = evaluate(prompts, completions)
    return {f"eval/gen/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and v == v}


def generation_eval(config, policy, tokenizer, workdir: str, reference=None) -> dict:
    """The generation evaluation a training run makes every `eval_every` steps and at the end: the toy task's
    (`toy_generation_eval`) when `eval_generation` > 0 and training on it, and the suites of `eval_suites`
    (`align_jax.evaluation.suites.training_eval`)."""
    out = {}
    if config.eval_generation and config.data.train.startswith("toy:"):
        out.update(toy_generation_eval(config, policy, tokenizer, workdir))
    if config.eval_suites:
        from align_jax.evaluation.suites import training_eval

        out.update(training_eval(config, policy, reference, tokenizer, workdir))
    return out
