"""Evaluation of a policy: greedy generation on held-out prompts, and held-out preference accuracy."""
from align_jax.evaluation.policy import generate_completions, preference_accuracy
