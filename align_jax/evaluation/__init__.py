"""Evaluation of a policy: greedy generation on held-out prompts, held-out preference accuracy, and the toy
task's generation quality per axis (`generation_eval`, which training runs call)."""
from align_jax.evaluation.policy import generate_completions, preference_accuracy
from align_jax.evaluation.toy import generation_eval, toy_generation_eval

__all__ = ["generate_completions", "generation_eval", "preference_accuracy", "toy_generation_eval"]
