"""DPO parity with TRL 1.x `DPOTrainer` on a tiny Hugging Face checkpoint (tests/fixtures/trl_dpo, made by
tests/fixtures/make_trl_dpo_fixture.py with torch + trl).

* tokenization: align-jax's pairwise tokenization of every row = TRL's (`prompt_ids + chosen_ids`, completion
  mask 0 on the prompt), conversational (chat template) and plain-string rows (EOS text appended);
* the per-row sequence log-probs of the initial model = TRL's;
* `align_jax.train.train` for 2 steps (batch = the 8 rows, FSDP over the 8 test devices, plain SGD, lr 5, no
  clipping, as the fixture's TRL config): step 1's metrics (before any update: `loss`, `rewards/*`, `logps/*`,
  `grad_norm`) and step 2's (after one update, so the rewards are non-zero) = TRL's logged metrics within 1e-4.
The stored TRL numbers make these run everywhere; `test_live_trl_matches_fixture` re-runs TRL (skipped only when
torch / trl are not installed).
"""

import importlib.util
import json
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "fixtures", "trl_dpo")
MODEL_DIR = os.path.join(FIXTURE, "model")
TOL = 1e-4

with open(os.path.join(FIXTURE, "expected.json")) as f:
    EXPECTED = json.load(f)
FORMATS = sorted(EXPECTED["data"])  # conversational, text


def _rows_path(fmt):
    return os.path.join(FIXTURE, EXPECTED["data"][fmt]["file"])


def _config(fmt, tmp_path):
    spec = importlib.util.spec_from_file_location("dpo_config", os.path.join(ROOT, "configs", "dpo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    trl = EXPECTED["trl_config"]
    c = mod.get_config("tiny")
    c.model.init_from = MODEL_DIR
    c.data.train = _rows_path(fmt)
    c.data.eval = ""
    c.data.shuffle = False
    c.data.max_length = trl["max_length"]
    c.data.length_buckets = (64, trl["max_length"])  # every batch here fits 64
    c.data.truncation_mode = trl["truncation_mode"]
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.toy_dir = str(tmp_path / "toy")
    c.batch_size = trl["per_device_train_batch_size"]
    c.eval_batch_size = c.batch_size
    c.total_steps = trl["max_steps"]
    c.mesh.fsdp = -1  # the 8 test devices: one row per device
    c.loss.name = "dpo:sigmoid"
    c.loss.kwargs = {"beta": trl["beta"], "label_smoothing": trl["label_smoothing"]}
    c.optimizer.name = trl["optim"]
    c.optimizer.learning_rate = trl["learning_rate"]
    c.optimizer.schedule = trl["lr_scheduler_type"]
    c.optimizer.warmup_steps = trl["warmup_steps"]
    c.optimizer.weight_decay = trl["weight_decay"]
    c.optimizer.max_grad_norm = trl["max_grad_norm"]
    c.checkpoint.every_steps = 100
    c.export = False
    c.progress_bar = False
    return c


@pytest.fixture(scope="module")
def align_jax_metrics(tmp_path_factory):
    """metrics.jsonl of one 2-step align-jax run per data format: {fmt: {step: metrics}}."""
    from align_jax.train import train

    out = {}
    for fmt in FORMATS:
        tmp = tmp_path_factory.mktemp(fmt)
        train(_config(fmt, tmp), str(tmp / "run"))
        with open(tmp / "run" / "metrics.jsonl") as f:
            out[fmt] = {m["step"]: m for m in map(json.loads, f) if "loss" in m}
    return out


def _diffs(ours: dict, theirs: dict) -> dict:
    return {k: abs(ours[k] - theirs[k]) for k in EXPECTED["metrics"]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenization_matches_trl(fmt):
    from transformers import AutoTokenizer

    from align_jax.data import formats, tokenize

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    cfg = tokenize.TokenizeConfig(EXPECTED["trl_config"]["max_length"])
    with open(_rows_path(fmt)) as f:
        rows = [json.loads(line) for line in f]
    for row, trl in zip(rows, EXPECTED["data"][fmt]["rows"], strict=True):
        ours = tokenize.tokenize_pairwise(formats.parse_pairwise(row), tok, cfg)
        for side in ("chosen", "rejected"):
            ids = trl["prompt_ids"] + trl[f"{side}_ids"]
            mask = [0] * len(trl["prompt_ids"]) + [1] * len(trl[f"{side}_ids"])
            np.testing.assert_array_equal(ours[f"{side}_input_ids"], ids, err_msg=f"{fmt} {side}: {row}")
            np.testing.assert_array_equal(ours[f"{side}_completion_mask"], mask, err_msg=f"{fmt} {side}: {row}")
            assert ids[-1] == tok.eos_token_id  # the completion ends with EOS (template / appended EOS text)


def test_sequence_logps_match_trl():
    """Per-row sum of completion-token log-probs of the initial model (both formats in one jitted forward)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from align_jax.models import load_pretrained
    from align_jax.models.logps import completion_token_logps, seq_logps

    rows = [r for fmt in FORMATS for r in EXPECTED["data"][fmt]["rows"]]
    seqs = [(r["prompt_ids"], r[f"{s}_ids"]) for r in rows for s in ("chosen", "rejected")]
    theirs = [r[f"{s}_logps"] for r in rows for s in ("chosen", "rejected")]
    L = 64
    ids, attn, comp = (np.zeros((len(seqs), L), np.int32) for _ in range(3))
    for i, (p, c) in enumerate(seqs):
        ids[i, :len(p) + len(c)], attn[i, :len(p) + len(c)], comp[i, len(p):len(p) + len(c)] = p + c, 1, 1

    @nnx.jit
    def logps_of(model, ids, attn, comp):
        return seq_logps(*completion_token_logps(model, ids, attn, comp, chunk_size=64))

    ours = jax.device_get(logps_of(load_pretrained(MODEL_DIR), jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(comp)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("step", [1, 2])
def test_dpo_metrics_match_trl(align_jax_metrics, fmt, step):
    ours, theirs = align_jax_metrics[fmt][step], EXPECTED["data"][fmt]["steps"][step - 1]
    if step == 1:  # policy = reference: the rewards are 0 and the loss is log 2, in both
        assert theirs["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    else:
        assert abs(theirs["rewards/margins"]) > 0.1 and theirs["rewards/accuracies"] > 0.5  # a real signal
    diffs = _diffs(ours, theirs)
    assert max(diffs.values()) < TOL, {k: (ours[k], theirs[k], d) for k, d in diffs.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_live_trl_matches_fixture(align_jax_metrics, fmt):
    """Re-runs TRL's DPOTrainer now (torch + trl installed): its metrics = the stored ones = align-jax's."""
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("make_trl_dpo_fixture",
                                                  os.path.join(HERE, "fixtures", "make_trl_dpo_fixture.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    live = mod.run_trl(MODEL_DIR, _rows_path(fmt), steps=len(EXPECTED["data"][fmt]["steps"]))
    for a, b in zip(live["rows"], EXPECTED["data"][fmt]["rows"], strict=True):
        assert {k: a[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} == \
            {k: b[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        assert a["chosen_logps"] == pytest.approx(b["chosen_logps"], abs=TOL)
        assert a["rejected_logps"] == pytest.approx(b["rejected_logps"], abs=TOL)
    for step, theirs in enumerate(live["steps"], start=1):
        assert max(_diffs(EXPECTED["data"][fmt]["steps"][step - 1], theirs).values()) < TOL  # TRL reproduces
        assert max(_diffs(align_jax_metrics[fmt][step], theirs).values()) < TOL
