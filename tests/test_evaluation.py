"""Held-out preference accuracy (used by the experiments' tables) against a naive numpy computation."""

import os

import numpy as np

from align_jax.evaluation import preference_accuracy
from align_jax.models import load_pretrained

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")


def _naive_seq_logps(model, ids, comp):
    logits = np.asarray(model(ids), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tok = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return (tok * comp[:, 1:]).sum(-1)


def test_preference_accuracy_matches_naive():
    model = load_pretrained(HF)
    rng = np.random.default_rng(0)
    B, L = 6, 10
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = rng.integers(1, 256, (B, L)).astype(np.int32)
        batch[f"{side}_attention_mask"] = np.ones((B, L), np.int32)
        comp = np.zeros((B, L), np.int32)
        comp[:, 4:] = 1
        batch[f"{side}_completion_mask"] = comp
    batch["example_weight"] = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
    c = _naive_seq_logps(model, batch["chosen_input_ids"], batch["chosen_completion_mask"])
    r = _naive_seq_logps(model, batch["rejected_input_ids"], batch["rejected_completion_mask"])
    want = float(((c > r) * batch["example_weight"]).sum() / 5)
    got = preference_accuracy(model, [batch], ref_model=model)
    assert 0 < want < 1 and abs(got["preference_accuracy"] - want) < 1e-6
    assert got["implicit_reward_accuracy"] == 0.0  # policy = reference: no pair has a positive implicit margin
