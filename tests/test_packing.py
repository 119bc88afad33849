"""Padding-free preference batches (align_jax.data.packing): first-fit decreasing by hand, packed rows that unpack to
the padded layout exactly, every packing algorithm (DPO with and without a reference, ORPO, pairwise (soft labels)
and groupwise reward models, offline GRPO with a reference, listwise DPO) giving the padded path's loss, metrics and gradients,
the loop's losses equal over several steps with gradient accumulation on 8 devices, and packing on by default
with fewer rows. (The multi-process and split-mesh tests run the packed default too.)"""

import json
import os

import numpy as np
import pytest

from util import load_config
from align_jax.data import packing
from align_jax.data.pipeline import collate_groupwise, collate_pairwise
from align_jax.train import train


def test_first_fit_decreasing_by_hand():
    # longest first: 6 -> row 0; 5 -> row 1 (0 has 2 left); 4 -> row 2; 3 -> row 1 (5+3 = 8); 2 -> row 0 (6+2)
    row, off, n = packing.first_fit_decreasing([5, 3, 4, 2, 6], 8)
    assert n == 3
    assert row.tolist() == [1, 1, 2, 0, 0] and off.tolist() == [0, 5, 0, 6, 0]
    with pytest.raises(ValueError, match="does not fit"):
        packing.first_fit_decreasing([9], 8)


def test_micro_batches_get_their_own_interleaved_rows():
    seqs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 24), np.zeros(0, np.int32), np.arange(30, 36)]
    p = packing.pack_batch(seqs, [0, 1, 0, 1, 0], length=8, pad_id=-1, micro_batches=2, row_multiple=4)
    assert p["packed_input_ids"].shape == (8, 8)  # micro-batch 0 needs 3 rows, 1 needs 1: 2 x 3 -> 8
    for a in (0, 1):
        rows = p["packed_input_ids"][a::2].reshape(-1)  # micro-batch a's rows, as train.step splits them
        for i in [i for i, m in enumerate([0, 1, 0, 1, 0]) if m == a]:
            n = len(seqs[i])
            np.testing.assert_array_equal(rows[p["token_index"][i, :n]], seqs[i])
    seg, pos = p["packed_segment_ids"], p["packed_positions"]
    assert ((seg > 0) == (p["packed_input_ids"] >= 0)).all()
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]


def _pair(rng, i):
    n_p, n_c, n_r = rng.integers(2, 9, size=3)
    return {"chosen_input_ids": rng.integers(1, 50, n_p + n_c).astype(np.int32),
            "chosen_completion_mask": np.r_[np.zeros(n_p), np.ones(n_c)].astype(np.int32),
            "rejected_input_ids": rng.integers(1, 50, n_p + n_r).astype(np.int32),
            "rejected_completion_mask": np.r_[np.zeros(n_p), np.ones(n_r)].astype(np.int32),
            "label_prob": 1.0, "record_index": i}


def test_packed_pairs_unpack_to_the_padded_batch():
    rng = np.random.default_rng(0)
    ex = [_pair(rng, i) for i in range(6)]  # 6 of a batch of 8: two padding pairs
    pad = collate_pairwise(ex, batch_size=8, buckets=(32,), pad_id=0)
    pk = collate_pairwise(ex, batch_size=8, buckets=(32,), pad_id=0,
                          packed={"length": 32, "micro_batches": 2, "row_multiple": 2})
    assert pk["packed_input_ids"].shape[0] < 16  # 16 sequences of <= 16 tokens in fewer rows of 32
    for side in ("chosen", "rejected"):
        for k in ("attention_mask", "completion_mask"):
            np.testing.assert_array_equal(pk[f"{side}_{k}"], pad[f"{side}_{k}"])
        for b in range(8):
            rows = pk["packed_input_ids"][b % 2::2].reshape(-1)  # pair b's micro-batch's rows
            n = int(pad[f"{side}_attention_mask"][b].sum())
            np.testing.assert_array_equal(rows[pk[f"{side}_token_index"][b, :n]], pad[f"{side}_input_ids"][b, :n])
    # each packed segment is one sequence with positions 0..n-1
    seg, pos = pk["packed_segment_ids"], pk["packed_positions"]
    for r in range(seg.shape[0]):
        for s in set(seg[r][seg[r] > 0].tolist()):
            assert pos[r][seg[r] == s].tolist() == list(range(int((seg[r] == s).sum())))
    assert int((seg > 0).sum()) == int(pad["chosen_attention_mask"].sum() + pad["rejected_attention_mask"].sum())


def test_packed_groups_unpack_to_the_padded_batch():
    rng = np.random.default_rng(1)
    ex = []
    for i in range(3):
        seqs = [rng.integers(1, 50, rng.integers(3, 12)).astype(np.int32) for _ in range(3 if i == 1 else 4)]
        ex.append({"input_ids": seqs, "completion_mask": [np.ones_like(s) for s in seqs],
                   "ranks": list(range(len(seqs))), "scores": [0.0] * len(seqs)})
    pad = collate_groupwise(ex, batch_size=4, buckets=(16,), pad_id=0, group_size=4)
    pk = collate_groupwise(ex, batch_size=4, buckets=(16,), pad_id=0, group_size=4,
                           packed={"length": 16, "micro_batches": 1, "row_multiple": 1})
    assert pk["token_index"].shape == (4, 4, 16) and "input_ids" not in pk
    flat = pk["packed_input_ids"].reshape(-1)
    for b in range(4):
        for j in range(4):
            n = int(pad["attention_mask"][b, j].sum())
            np.testing.assert_array_equal(flat[pk["token_index"][b, j, :n]], pad["input_ids"][b, j, :n])
    assert pk["packed_input_ids"].shape[0] < 11  # 11 responses


def _losses(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f) if "loss" in m}


# name -> (config file, arg, overrides): every packing algorithm and the batch paths they take
CASES = {
    "dpo_sigmoid": ("dpo", "tiny", {}),
    "dpo_sigmoid_rows_of_128": ("dpo", "tiny", {"data.packing_length": 128}),
    "dpo_ipo_reference_free": ("dpo", "tiny", {"loss.name": "dpo:ipo", "loss.reference_free": True}),
    "orpo": ("orpo", "tiny", {}),
    "reward_pairwise_soft": ("reward_model", "tiny", {}),
    "reward_groupwise": ("reward_model", "tiny,groupwise", {}),
    "grpo_offline_reference": ("grpo", "tiny,offline", {"loss.kwargs.beta": 0.04, "loss.reference_free": False}),
    "listwise_dpo": ("dpo", "tiny,listwise", {}),
}


def _loss_metrics_grads(name, packed, tmp_path):
    """The algorithm's loss, metrics and gradients on the first two training batches of its tiny config (the
    policy a step away from the reference, so log-ratios are not 0)."""
    import jax
    from flax import nnx

    from align_jax.algorithms import get_algorithm
    from align_jax.parallel import host_batch
    from align_jax.train.data import make_data
    from align_jax.train.model import build_model, build_reference
    from align_jax.train.tokenizer import load_tokenizer

    file, arg, over = CASES[name]
    c = load_config(file, arg, **{"data.eval": "", "data.packing": packed, **over})
    algo = get_algorithm(c.algorithm)
    data = make_data(c, str(tmp_path / str(packed)), load_tokenizer(c), algo)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    model = build_model(c, mesh, algo)
    ref = build_reference(c, model, algo)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x * 1.01, params)  # not the reference's weights

    @jax.jit
    def f(params, batch):
        def loss(p):
            return algo.loss(nnx.merge(graphdef, p, rest), batch, ref, c)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, metrics, grads

    it = iter(data.train)
    out = []
    for _ in range(2):
        batch = host_batch(next(it))
        assert ("packed_input_ids" in batch) == packed
        out.append(jax.device_get(f(params, batch)))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_loss_metrics_and_gradients_equal_padded(name, tmp_path):
    got, want = (_loss_metrics_grads(name, p, tmp_path) for p in (True, False))
    for (lg, mg, gg), (lw, mw, gw) in zip(got, want):
        np.testing.assert_allclose(lg, lw, rtol=1e-5, atol=1e-6, err_msg=name)
        assert set(mg) == set(mw)
        for k in mw:
            np.testing.assert_allclose(mg[k], mw[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
        import jax

        for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{name} gradient")
        assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(gw))


def test_packed_training_equals_padded_over_steps_with_accumulation(tmp_path):
    """The whole loop (8 devices, 2 micro-batches each packed into its own rows): the same losses and metrics
    packed as padded over 3 steps."""
    out = {}
    for packed in (True, False):
        c = load_config("dpo", "tiny", **{"total_steps": 3, "checkpoint.every_steps": 3, "export": False,
                                          "eval_generation": 0, "data.eval": "", "data.packing": packed,
                                          "optimizer.grad_accum_steps": 2, "batch_size": 16})
        train(c, str(tmp_path / str(packed)))
        out[packed] = _losses(str(tmp_path / str(packed)))
    assert sorted(out[True]) == sorted(out[False]) == [1, 2, 3]
    for step in (1, 2, 3):
        a, b = out[True][step], out[False][step]
        for k in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {k}")


@pytest.mark.parametrize("file,arg", [("dpo", ""), ("grpo", "offline")])
def test_packing_is_the_default_for_preference_data_and_saves_rows(file, arg, tmp_path):
    """The configs' own training batches (not tiny): packed by default, every real token kept, fewer rows."""
    from align_jax.algorithms import get_algorithm
    from align_jax.train.data import make_data
    from align_jax.train.tokenizer import load_tokenizer

    c = load_config(file, arg)
    assert c.data.packing is None
    algo = get_algorithm(c.algorithm)
    data = make_data(c, str(tmp_path), load_tokenizer(c), algo)
    batch = next(iter(data.train))
    assert "packed_input_ids" in batch
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    sequences = sum(int((m.sum(-1) > 0).sum()) for m in masks)
    real = sum(int(m.sum()) for m in masks)
    rows, L = batch["packed_input_ids"].shape
    assert int((batch["packed_segment_ids"] > 0).sum()) == real
    assert rows * 2 <= sequences, (rows, sequences)  # toy sequences are <= half of max_length: 2+ per row
    assert real / (rows * L) > 0.6


def test_packing_is_set_from_the_command_line(tmp_path):
    """`data.packing` defaults to None (= on for preference data) and `--config.data.packing=False` / `True` set it
    (a None-valued ml_collections field would refuse the override)."""
    import subprocess
    import sys

    from util import ROOT

    for value in ("False", "True"):
        p = subprocess.run([sys.executable, "-m", "align_jax.main", "--config=configs/dpo.py:tiny",
                            f"--workdir={tmp_path / value}", f"--config.data.packing={value}", "--print_config"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert f"data.packing: {value} " in p.stdout, p.stdout[-2000:]


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_sft_packed_rows_equal_the_same_examples_padded(fmt, tmp_path):
    """SFT packs several examples per row (segment ids, positions restarting at 0; TRL's packing), so a packed batch
    holds more examples than a padded one: the check is per example set. Each packed batch of the tiny SFT config
    (its chat examples: loss on the completions; or plain text: loss on every token, so each segment's first token
    must not be predicted from the previous example) is cut back into one right-padded row per segment; loss (the
    token mean of the NLL) and gradients must be equal."""
    import jax
    from flax import nnx

    from align_jax.algorithms import get_algorithm
    from align_jax.parallel import host_batch
    from align_jax.train.data import make_data
    from align_jax.train.model import build_model
    from align_jax.train.tokenizer import load_tokenizer

    over = {}
    if fmt == "text":
        from align_jax.data.toy import generate

        pairs = [json.loads(x) for x in open(generate(tmp_path / "toy")["pairs"])][:200]
        (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": r["chosen"][-1]["content"]}) + "\n"
                                                     for r in pairs))
        over = {"data.train": str(tmp_path / "text.jsonl")}
    c = load_config("sft", "tiny", **{"data.eval": "", "data.packing": True, **over})
    algo = get_algorithm("sft")
    data = make_data(c, str(tmp_path), load_tokenizer(c), algo)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    graphdef, params, rest = nnx.split(build_model(c, mesh, algo), nnx.Param, ...)

    @jax.jit
    def f(params, batch):
        return jax.value_and_grad(lambda p: algo.loss(nnx.merge(graphdef, p, rest), batch, None, c)[0])(params)

    it = iter(data.train)
    for _ in range(2):
        pk = host_batch(next(it))
        assert "segment_ids" in pk and pk["segment_ids"].max() > 1  # rows really hold several examples
        L = pk["input_ids"].shape[1]
        rows = {"input_ids": [], "attention_mask": [], "completion_mask": []}
        for r in range(pk["input_ids"].shape[0]):
            for s in range(1, int(pk["segment_ids"][r].max()) + 1):
                at = np.flatnonzero(pk["segment_ids"][r] == s)
                assert (pk["positions"][r, at] == np.arange(len(at))).all()
                for k in rows:
                    src = np.ones(L, np.int32) if k == "attention_mask" else pk[k][r]
                    rows[k].append(np.pad(src[at], (0, L - len(at))))
        pad = {k: np.stack(v).astype(np.int32) for k, v in rows.items()}
        pad["example_weight"] = np.ones(len(pad["input_ids"]), np.float32)
        assert len(pad["input_ids"]) > len(pk["input_ids"])
        (lp, gp), (lq, gq) = jax.device_get(f(params, pk)), jax.device_get(f(params, pad))
        np.testing.assert_allclose(lp, lq, rtol=1e-5)
        assert 2.0 < lq < 7.0  # ~ log(256) at random init: a real NLL, not a masked-out 0
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gq)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
