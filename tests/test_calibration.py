"""align_jax.evaluation.calibration on hand-computed numbers, and the held-out pair helpers it reads
(evaluation.policy: pair_sequence_logps, pair_reward_scores) against the library's other code paths."""

import json
import math

import numpy as np
import pytest

from align_jax.evaluation import calibration as cal


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_implied_probabilities_by_hand():
    # DPO: β·[(c − c_ref) − (r − r_ref)] = 0.1·[(−10 + 12) − (−15 + 13)] = 0.4
    assert cal.dpo_probs([-10.0], [-15.0], [-12.0], [-13.0], 0.1)[0] == pytest.approx(sig(0.4), rel=1e-12)
    # ORPO: mean log-prob log 0.25 -> odds 1/3; log 0.5 -> odds 1: σ(log(1/3) − 0) = 1/4
    assert cal.log_odds([math.log(0.25)])[0] == pytest.approx(math.log(1 / 3), rel=1e-12)
    assert cal.orpo_probs([math.log(0.25)], [math.log(0.5)])[0] == pytest.approx(0.25, rel=1e-12)
    assert cal.bt_probs([2.0, -800.0], [1.0, 0.0]).tolist() == pytest.approx([sig(1.0), 0.0])  # no overflow
    assert np.isfinite(cal.log_odds([0.0, -1e-30, -50.0])).all()  # P -> 1 stays finite


def test_calibration_metrics_by_hand():
    # bins of p̂: 0.05 -> 0, 0.15 -> 1, 0.91 and 0.99 -> 9 (their errors cancel inside the bin)
    m = cal.calibration_metrics([0.05, 0.15, 0.91, 0.99], [0.1, 0.1, 0.95, 0.95])
    assert m["prob_error"] == pytest.approx((0.05 + 0.05 + 0.04 + 0.04) / 4)
    assert m["ece"] == pytest.approx(0.25 * 0.05 + 0.25 * 0.05 + 0.5 * 0.0)
    assert m["mean_p_hat"] == pytest.approx(0.525) and m["mean_p_true"] == pytest.approx(0.525)
    assert cal.calibration_metrics([1.0], [1.0])["ece"] == 0.0  # p̂ = 1 falls in the last bin
    with pytest.raises(ValueError):
        cal.calibration_metrics([0.5, 0.5], [0.5])


def test_pair_helpers_equal_the_librarys_other_paths(tmp_path):
    """pair_sequence_logps: its chosen > rejected rate is preference_accuracy, its token counts the completion
    masks; pair_reward_scores equals rl.reward_model.score_token_ids on the same rows."""
    from flax import nnx

    from align_jax.data import build_dataset, make_loader
    from align_jax.data.toy import load_tokenizer, toy_model_config
    from align_jax.evaluation.policy import pair_reward_scores, pair_sequence_logps, preference_accuracy
    from align_jax.models.config import from_hf_config
    from align_jax.models.heads import ScalarHeadModel
    from align_jax.models.llama import Transformer
    from align_jax.rl.reward_model import score_token_ids

    tok = load_tokenizer()
    pairs = [{"prompt": f"What is {a} + {a}?", "chosen": f"{2 * a}.", "rejected": "I cannot help with that, sorry."}
             for a in range(7)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    def loader():
        builder, _ = build_dataset(str(path), kind="pairwise", data_dir=str(tmp_path / "tfds"))
        return make_loader(builder.as_data_source("train"), tok, kind="pairwise", batch_size=4, shuffle=False,
                           num_epochs=1, drop_remainder=False, max_length=64, length_buckets=(64,))[0]

    cfg = from_hf_config(toy_model_config())
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    out = pair_sequence_logps(model, loader())
    assert all(len(v) == 7 for v in out.values())  # the padding row of the second batch dropped
    acc = preference_accuracy(model, loader())["preference_accuracy"]
    assert np.mean(out["chosen"] > out["rejected"]) == pytest.approx(acc)
    batches = list(loader())
    masks = {s: np.concatenate([b[f"{s}_completion_mask"][b["example_weight"] > 0] for b in batches]) for s in
             ("chosen", "rejected")}
    for s in ("chosen", "rejected"):  # tokens 1..T-1 that are completion tokens
        np.testing.assert_array_equal(out[f"{s}_tokens"], masks[s][:, 1:].sum(-1))
    assert (out["rejected_tokens"] > out["chosen_tokens"]).all()

    rm = ScalarHeadModel(cfg, rngs=nnx.Rngs(4))
    c, r = pair_reward_scores(rm, loader())
    want = {s: np.concatenate([np.asarray(score_token_ids(rm, b[f"{s}_input_ids"], b[f"{s}_attention_mask"]))
                               [b["example_weight"] > 0] for b in batches]) for s in ("chosen", "rejected")}
    np.testing.assert_allclose(c, want["chosen"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r, want["rejected"], rtol=1e-5, atol=1e-6)
    assert np.std(c) > 0
