"""Precomputed reference log-probs kept on disk (align_jax.algorithms.reference_cache): written once per (data,
tokenizer, reference weights, lengths, mesh), reused by a later run and by a resumed one with bit-identical
results, a different reference gets its own file, a damaged file is recomputed."""

import json
import logging
import os

import numpy as np
import pytest

from util import final_params, load_config, train_and_kill
from align_jax.algorithms import reference_cache
from align_jax.train import train

DATA_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "align_jax_test_refcache_tfds")
TOY_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "align_jax_test_refcache_toy")
N_PAIRS = 160  # a small toy pair file: the reference pass over it is what every run here pays


def _cfg(**kw):
    if not os.path.exists(os.path.join(TOY_DIR, "pairs.jsonl")):
        from align_jax.data.toy import datasets

        datasets.generate(TOY_DIR, n_sft=8, n_pairs=N_PAIRS, n_groups=8, n_prompts=8, n_eval=8, n_eval_pairs=8)
    return load_config("dpo", **{"data.eval": "", "data.length_buckets": (64,), "total_steps": 4,
                                 "data.toy_dir": TOY_DIR, "optimizer.schedule": "constant",  # one compiled step
                                 "checkpoint.every_steps": 2, "reference.precompute": True,
                                 "data.data_dir": DATA_DIR, "export": False, "eval_batch_size": 64, **kw})


def _steps(wd):
    return {m["step"]: m for m in map(json.loads, open(os.path.join(wd, "metrics.jsonl"))) if "loss" in m}


def _files():
    d = os.path.join(DATA_DIR, reference_cache.DIRNAME)
    return sorted(f for f in os.listdir(d) if f.endswith(".npz")) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    import shutil

    shutil.rmtree(os.path.join(DATA_DIR, reference_cache.DIRNAME), ignore_errors=True)
    wd = str(tmp_path_factory.mktemp("refcache") / "first")
    train(_cfg(), wd)
    return wd


def test_written_once_and_reused_with_the_same_numbers(first, tmp_path, caplog):
    files = _files()
    assert len(files) == 1
    with np.load(os.path.join(DATA_DIR, reference_cache.DIRNAME, files[0])) as f:
        table = f["table"]
        desc = json.loads(str(f["desc"]))
    assert table.shape == (N_PAIRS, 2) and np.isfinite(table).all() and (table < 0).all()  # sums of log-probs
    assert desc["what"] == "dpo_pair_logps" and desc["loader"]["max_length"] == 64
    with caplog.at_level(logging.INFO, logger="align_jax.algorithms.dpo"):
        train(_cfg(), str(tmp_path / "second"))
    assert any("reused from" in r.getMessage() for r in caplog.records)
    assert _files() == files
    a, b = _steps(first), _steps(str(tmp_path / "second"))
    for s in a:
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[s][k] == b[s][k], (s, k)


def test_resume_after_kill9_reuses_it_and_is_bit_identical(first, tmp_path):
    killed = str(tmp_path / "killed")
    train_and_kill("from test_reference_cache import _cfg", "_cfg()", killed)
    train(_cfg(), killed)
    a, b = _steps(first), _steps(killed)
    for s in (3, 4):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["rewards/margins"] == b[s]["rewards/margins"]
    for x, y in zip(final_params(first, 4), final_params(killed, 4)):
        np.testing.assert_array_equal(x, y)
    assert len(_files()) == 1


def test_another_reference_gets_its_own_file_and_a_damaged_one_is_recomputed(first, tmp_path, caplog):
    before = _files()
    train(_cfg(seed=1, total_steps=1), str(tmp_path / "seed1"))  # toy init from seed 1: another reference
    after = _files()
    assert len(after) == 2 and set(before) < set(after)
    new = (set(after) - set(before)).pop()
    path = os.path.join(DATA_DIR, reference_cache.DIRNAME, new)
    good = np.load(path)["table"]
    with open(path, "wb") as f:
        f.write(b"not an npz")
    with caplog.at_level(logging.WARNING):
        train(_cfg(seed=1, total_steps=1), str(tmp_path / "seed1b"))
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.load(path)["table"], good)
