"""Listwise DPO (algorithms/listwise_dpo.py): at K = 2 it is the library's pairwise DPO on the same pairs (its own
log-prob code), its eval metrics by hand from the sequence log-probs, and configs/dpo.py:tiny,listwise trains
through the CLI, its first step (policy = reference) at the Plackett–Luce loss of all-zero implicit rewards."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from util import ROOT, SHARED, load_config
from align_jax.algorithms.dpo import dpo_loss
from align_jax.algorithms.listwise_dpo import listwise_dpo_eval, listwise_dpo_loss, listwise_inputs
from align_jax.data.toy import toy_model_config
from align_jax.models.config import from_hf_config
from align_jax.models.llama import Transformer


def _models():
    cfg = from_hf_config(toy_model_config())
    return Transformer(cfg, rngs=nnx.Rngs(1)), Transformer(cfg, rngs=nnx.Rngs(2))  # policy, reference


def _groups(K, B=3, L=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 50, size=(B, K, L)).astype(np.int32)
    attn = np.ones((B, K, L), np.int32)
    attn[1, 1, 9:] = 0  # a shorter response
    comp = np.zeros((B, K, L), np.int32)
    comp[:, :, 5:] = 1
    comp *= attn
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "group_mask": np.ones((B, K)),
            "example_weight": np.ones(B)}


def _cfg(name, **kwargs):
    return ml_collections.ConfigDict({"chunk_size": 8192, "loss": {"name": name, "kwargs": kwargs}})


def test_two_responses_is_the_librarys_dpo():
    """K = 2, no tie: listwise DPO = dpo:sigmoid on (best, worst), with a policy that is not the reference."""
    policy, ref = _models()
    g = _groups(2)
    ranks = np.array([[0, 1], [1, 0], [0, 1]], np.int32)
    group = {k: jnp.asarray(v) for k, v in dict(g, ranks=ranks).items()}
    listwise, _ = listwise_dpo_loss(policy, group, ref, _cfg("listwise_dpo", beta=0.3))
    B = 3
    best, worst = ranks.argmin(1), ranks.argmax(1)
    pick = lambda a, k: jnp.asarray(a[np.arange(B), k])  # noqa: E731
    pair = {f"{side}_{name}": pick(g[name], k) for side, k in (("chosen", best), ("rejected", worst))
            for name in ("input_ids", "attention_mask", "completion_mask")}
    pair["label_probs"] = jnp.ones(B)
    pairwise, _ = dpo_loss(policy, pair, ref, _cfg("dpo:sigmoid", beta=0.3))
    assert abs(float(listwise) - float(pairwise)) < 1e-5 and abs(float(pairwise) - math.log(2)) > 1e-3


def test_eval_metrics_by_hand():
    """Per group: `loss` = the Plackett–Luce NLL of β·h (the training loss of that group alone), top-1 and pairwise
    ordering accuracy of β·h against the ranks (ties do not count as pairs)."""
    policy, ref = _models()
    g = _groups(4)
    g["ranks"] = np.array([[0, 1, 2, 3], [2, 0, 0, 1], [3, 2, 1, 0]], np.int32)
    g["group_mask"][2, 3] = 0  # group 2: three responses
    batch = {k: jnp.asarray(v) for k, v in g.items()}
    cfg = _cfg("listwise_dpo", beta=0.5)
    out = {k: np.asarray(v) for k, v in listwise_dpo_eval(policy, batch, ref, cfg).items()}
    lp, rlp, mask = (np.asarray(x, np.float64) for x in listwise_inputs(policy, batch, ref, cfg))
    r = 0.5 * (lp - rlp)
    for b in range(3):
        valid = [i for i in range(4) if mask[b, i] > 0]
        ranks = g["ranks"][b]
        nll = sum(-r[b, i] + math.log(sum(math.exp(r[b, j]) for j in valid if j == i or ranks[j] > ranks[i]))
                  for i in valid)
        pairs = [(i, j) for i in valid for j in valid if ranks[i] < ranks[j]]
        acc = sum(r[b, i] > r[b, j] for i, j in pairs) / len(pairs)
        top = max(valid, key=lambda i: r[b, i])
        np.testing.assert_allclose(out["loss"][b], nll, rtol=1e-5)
        np.testing.assert_allclose(out["rewards/accuracies"][b], acc)
        assert out["rewards/top1_accuracy"][b] == float(ranks[top] == min(ranks[i] for i in valid))
        one = {k: v[b:b + 1] for k, v in batch.items()}
        np.testing.assert_allclose(float(listwise_dpo_loss(policy, one, ref, cfg)[0]), nll, rtol=1e-5)
    assert 0 < out["rewards/accuracies"].mean() < 1  # random models: neither all right nor all wrong


def test_trains_through_the_cli(tmp_path):
    """2 steps of configs/dpo.py:tiny,listwise (toy ranked groups of 4, live reference, packed batches): step 1
    has policy = reference, so every implicit reward is 0 and the loss is the mean over the batch's groups of
    Σ_i log |C_i| (C_i: i and the valid responses ranked strictly below it), from the same first batch."""
    from align_jax.algorithms import get_algorithm
    from align_jax.train.data import make_data
    from align_jax.train.tokenizer import load_tokenizer

    wd = tmp_path / "run"
    args = ["--config=configs/dpo.py:tiny,listwise", f"--workdir={wd}", "--config.total_steps=2",
            "--config.checkpoint.every_steps=2", f"--config.data.toy_dir={SHARED}/toy",
            f"--config.data.data_dir={SHARED}/tfds"]
    proc = subprocess.run([sys.executable, "-m", "align_jax.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = {r["step"]: r for r in map(json.loads, open(wd / "metrics.jsonl")) if "loss" in r}
    assert sorted(m) == [1, 2]
    assert m[1]["rewards/margins"] == m[1]["rewards/mean"] == m[1]["rewards/accuracies"] == 0.0
    assert m[1]["grad_norm"] > 0 and np.isfinite(m[2]["loss"]) and m[2]["rewards/margins"] != 0.0

    c = load_config("dpo", "tiny,listwise")
    first = next(iter(make_data(c, str(tmp_path / "data"), load_tokenizer(c), get_algorithm(c.algorithm)).train))
    ranks, valid = first["ranks"], first["group_mask"] > 0
    want = np.mean([sum(math.log(1 + sum(valid[b, j] and ranks[b, j] > ranks[b, i] for j in range(ranks.shape[1])))
                        for i in range(ranks.shape[1]) if valid[b, i]) for b in range(len(ranks))])
    assert want > 1.0
    np.testing.assert_allclose(m[1]["loss"], want, rtol=1e-5)
    assert os.path.exists(wd / "export" / "model.safetensors")
