"""Evaluation of a trained policy and/or reward model: `python -m align_jax.evaluate` (see its docstring).

    python -m align_jax.evaluate --model=/tmp/dpo --reference=/tmp/sft --out=/tmp/dpo_eval
    python -m align_jax.evaluate --model=/tmp/dpo --suite=ifeval,safety --config.generation.max_new_tokens=256
    python -m align_jax.evaluate --reward_model=/tmp/rm --suite=rewardbench --config.rewardbench.pairs=rb.jsonl
    python -m align_jax.evaluate --config=configs/evaluate.py:tiny --model=... --out=...   # a few prompts per suite

Every data file defaults to a small set shipped in `align_jax/evaluation/data/` (written for this project), so
every suite runs offline out of the box; point a suite at your own file (same format, documented in its module)
for numbers you can publish.
"""

from align_jax.evaluation.suites import default_config


def get_config(arg: str = ""):
    """Every key and its comment: `align_jax.evaluation.suites.default_config`."""
    return default_config(arg)
