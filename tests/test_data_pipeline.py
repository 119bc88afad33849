"""Grain pipeline: seeds, sharding, checkpoint/restore, bucketing, packing, bad examples at tokenization time."""

import glob
import json
import os

import grain
import numpy as np
import pytest
from etils import epath

from align_jax.data.builders import build_dataset
from align_jax.data.formats import DataError
from align_jax.data import pipeline, tokenize
from align_jax.data.pipeline import make_loader
from test_data_tokenize import BOS, CHAT_TEMPLATE, EOS, FINE, HELLO, PAD, VOCAB, WORLD, make_tokenizer

TOK = make_tokenizer()
N = 20


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Pairwise example i: prompt "hello <i>", chosen " fine" * (i % 5 + 1), rejected " world"."""
    d = tmp_path_factory.mktemp("pipe")
    rows = [{"prompt": f"hello {i}", "chosen": " fine" * (i % 5 + 1), "rejected": " world"} for i in range(N)]
    path = d / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder, _ = build_dataset(str(path), kind="pairwise", data_dir=str(d / "tfds"))
    return builder.as_data_source("train")


def example_ids(batch):
    """Index i of each real row (the token after BOS, HELLO)."""
    rows = batch["chosen_input_ids"][batch["example_weight"] > 0]
    assert (rows[:, :2] == [BOS, HELLO]).all()
    return [int(VOCAB_INV[t]) for t in rows[:, 2]]


VOCAB_INV = {v: k for k, v in VOCAB.items()}


def loader(source, **kw):
    kw = {"kind": "pairwise", "batch_size": 4, "seed": 0, "length_buckets": (4, 8, 16), **kw}
    return make_loader(source, TOK, **kw)[0]


def order(source, **kw):
    return [i for b in loader(source, num_epochs=1, **kw) for i in example_ids(b)]


def test_seed_determinism_and_epochs(source):
    assert order(source, shuffle=False) == list(range(N))
    a, b, c = order(source, seed=1), order(source, seed=1), order(source, seed=2)
    assert a == b and sorted(a) == list(range(N)) and a != c and a != list(range(N))
    two = [i for batch in loader(source, seed=1, num_epochs=2) for i in example_ids(batch)]
    assert two[:N] == a and sorted(two[N:]) == list(range(N)) and two[N:] != a  # reshuffled each epoch


def test_sharding_covers_everything_once(source):
    shards = [
        order(source, shard_options=grain.sharding.ShardOptions(k, 2), drop_remainder=False, seed=3) for k in (0, 1)
    ]
    assert sorted(shards[0] + shards[1]) == list(range(N)) and len(shards[0]) == len(shards[1]) == N // 2
    assert set(shards[0]) == set(range(0, N, 2))  # each process reads only its own records
    # One process: ShardByJaxProcess is the identity.
    assert order(source, seed=3, drop_remainder=False) == order(source, seed=3, shard_by_process=False)


def test_a_stream_gives_the_same_global_batches_on_any_number_of_processes(source):
    """Training streams (num_epochs=None): process k of 2 (batch 2 each) reads rows [2k, 2k+2) of each global
    batch of 4; concatenated in process order they are the one-process batches of 4, over epoch boundaries."""
    def stream(n, **kw):
        it = iter(loader(source, num_epochs=None, seed=5, **kw))
        return [example_ids(next(it)) for _ in range(n)]

    one = stream(6, batch_size=4)
    two = [stream(6, batch_size=2, shard_options=grain.sharding.ShardOptions(k, 2)) for k in (0, 1)]
    glued = [two[0][i] + two[1][i] for i in range(6)]
    assert glued == one
    assert not set(sum(two[0][:5], [])) & set(sum(two[1][:5], []))  # an epoch: each row read by one process
    assert sorted(sum(one[:N // 4], [])) == list(range(N))  # a whole epoch, reshuffled after


def test_drop_remainder_and_padding_rows(source):
    kept = list(loader(source, num_epochs=1, batch_size=6, drop_remainder=True))
    assert len(kept) == 3
    padded = list(loader(source, num_epochs=1, batch_size=6, drop_remainder=False))
    assert len(padded) == 4 and padded[-1]["example_weight"].tolist() == [1, 1, 0, 0, 0, 0]
    assert (padded[-1]["chosen_input_ids"][2:] == PAD).all()


def test_bucket_padding(source):
    for batch in loader(source, num_epochs=1, shuffle=False):
        longest = max(batch["chosen_attention_mask"].sum(1).max(), batch["rejected_attention_mask"].sum(1).max())
        length = batch["chosen_input_ids"].shape[1]
        assert length == min(b for b in (4, 8, 16) if b >= longest) and batch["rejected_input_ids"].shape[1] == length
    first = next(iter(loader(source, shuffle=False)))  # examples 0..3: chosen has i+1 " fine"
    assert first["chosen_input_ids"][3].tolist() == [BOS, HELLO, VOCAB["3"]] + [FINE] * 4 + [EOS] + [PAD] * 0
    assert first["chosen_completion_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert first["rejected_input_ids"][0].tolist() == [BOS, HELLO, VOCAB["0"], WORLD, EOS, PAD, PAD, PAD]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_restore_state_gives_identical_next_batches(source, tmp_path, prefetch):
    ds = loader(source, seed=5, prefetch=prefetch)  # infinite: crosses epoch boundaries
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    expected = [next(it) for _ in range(4)]

    fresh = iter(ds)
    fresh.set_state(state)
    restored = iter(loader(source, seed=5, prefetch=prefetch))  # a new pipeline, restored through the handler
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=restored)
    for got in ([next(fresh) for _ in range(4)], [next(restored) for _ in range(4)]):
        for e, g in zip(expected, got):
            assert e.keys() == g.keys() and all(np.array_equal(e[k], g[k]) for k in e)


def test_overlong_prompt_reported_at_tokenization(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "hello", "chosen": " fine", "rejected": " world"}] * 3
    rows[1] = {"prompt": "hello world fine fine fine fine", "chosen": " fine", "rejected": " world"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder, _ = build_dataset(str(path), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    src = builder.as_data_source("train")
    kw = dict(kind="pairwise", batch_size=2, shuffle=False, num_epochs=1, max_length=6, length_buckets=(8,))
    with pytest.raises(DataError, match=f"{path}:2: prompt has 7 tokens, >= max_length=6"):
        list(make_loader(src, TOK, **kw)[0])
    ds, skips = make_loader(src, TOK, on_bad_example="skip", **kw)
    batches = list(ds)
    assert len(batches) == 1 and batches[0]["example_weight"].tolist() == [1, 1]
    assert skips.num_skipped == 1 and skips.reasons[0].startswith(f"{path}:2: prompt has 7 tokens")


def test_sft_packing_segments_and_positions(tmp_path):
    texts = ["hello", "hello world fine", "hello world", "hello fine fine fine fine"]  # 3, 5, 4, 7 tokens w/ BOS+EOS
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    builder, _ = build_dataset(str(path), kind="sft", data_dir=str(tmp_path / "tfds"))
    ds, _ = make_loader(
        builder.as_data_source("train"), TOK, kind="sft", batch_size=2, shuffle=False, num_epochs=1,
        max_length=8, length_buckets=(8,), packing=True, drop_remainder=False,
    )  # fmt: skip
    b1, b2 = list(ds)
    # First fit into 2 bins of 8: [3 + 5], [4]; the 7-token text fits neither -> bins are emitted, then [7].
    assert b1["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert b1["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert b1["input_ids"].tolist() == [
        [BOS, HELLO, EOS, BOS, HELLO, WORLD, FINE, EOS], [BOS, HELLO, WORLD, EOS, PAD, PAD, PAD, PAD]
    ]  # fmt: skip
    assert b1["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert b1["completion_mask"].tolist() == b1["attention_mask"].tolist()  # plain text: loss on all tokens
    assert b2["segment_ids"].tolist() == [[1] * 7 + [0], [0] * 8] and b2["example_weight"].tolist() == [1, 0]
    assert b2["positions"].tolist()[0] == [0, 1, 2, 3, 4, 5, 6, 0]


def test_orbax_checkpoint_manager_restores_iterator(source, tmp_path):
    import orbax.checkpoint as ocp

    ds = loader(source, seed=9)
    it = iter(ds)
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = next(it)
    restored = iter(loader(source, seed=9))
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    got = next(restored)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ValueError, match="not those of kind='sft'"):
        make_loader(source, TOK, kind="sft", batch_size=2)


def built(tmp_path, rows, kind="pairwise"):
    """(path, source) of ``rows`` written as JSONL and built."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder, _ = build_dataset(str(path), kind=kind, data_dir=str(tmp_path / "tfds"))
    return str(path), builder.as_data_source("train")


LONG = {"prompt": "hello world fine fine fine fine", "chosen": " fine", "rejected": " world"}  # prompt: 7 tokens
TOO_LONG = "prompt has 7 tokens, >= max_length=6: no completion token would remain; raise max_length"


def test_skips_counted_once_before_training_over_epochs_and_restarts(tmp_path):
    rows = [{"prompt": f"hello {i}", "chosen": " fine", "rejected": " world"} for i in range(5)]
    rows[1] = rows[3] = LONG
    path, src = built(tmp_path, rows)
    kw = dict(kind="pairwise", batch_size=2, seed=0, max_length=6, length_buckets=(8,), on_bad_example="skip")
    ds, skips = make_loader(src, TOK, **kw)
    assert skips.num_skipped == 2 and [r.split(" (or")[0] for r in skips.reasons] == [
        f"{path}:2: {TOO_LONG}", f"{path}:4: {TOO_LONG}"
    ]  # fmt: skip
    it = iter(ds)  # infinite: 15 batches = 10 epochs of the 3 good records
    seen = [i for _ in range(15) for i in next(it)["record_index"].tolist()]
    assert skips.num_skipped == 2 and sorted(seen) == sorted([0, 2, 4] * 10)  # original record indices kept
    _, again = make_loader(src, TOK, **kw)  # a restarted run
    assert again == skips


def test_validation_pass_cached_in_process_and_next_to_the_dataset(tmp_path, monkeypatch):
    calls = []
    real = tokenize.TOKENIZERS["pairwise"]
    monkeypatch.setitem(tokenize.TOKENIZERS, "pairwise", lambda ex, tok, cfg: calls.append(1) or real(ex, tok, cfg))
    rows = [{"prompt": f"hello {i}", "chosen": " fine", "rejected": " world"} for i in range(4)]
    rows[1] = LONG
    path, src = built(tmp_path, rows)
    kw = dict(kind="pairwise", max_length=6, length_buckets=(8,), on_bad_example="skip")
    _, skips = make_loader(src, TOK, batch_size=2, **kw)
    assert len(calls) == 4 and skips.num_skipped == 1
    _, again = make_loader(src, TOK, batch_size=1, shuffle=False, num_epochs=1, drop_remainder=False, **kw)  # eval
    assert len(calls) == 4 and again == skips
    (saved,) = glob.glob(os.path.join(src.dataset_info.data_dir, "tokenize_check-train-*.json"))
    assert json.loads(open(saved).read())["bad"] == [1]
    pipeline._CHECKS.clear()  # a new process: reads the saved pass
    _, restarted = make_loader(src, TOK, batch_size=2, **kw)
    assert len(calls) == 4 and restarted == skips
    _, other = make_loader(src, TOK, batch_size=2, **{**kw, "max_length": 8})  # other options: another pass
    assert len(calls) == 8 and other.num_skipped == 0
    with pytest.raises(DataError, match=f"^{path}:2: {TOO_LONG}"):  # raise mode on a cached pass
        make_loader(src, TOK, batch_size=2, **{**kw, "on_bad_example": "raise"})


def test_no_usable_example_raises_instead_of_looping_forever(tmp_path):
    rows = [{"prompt": f"hello world {i}", "chosen": " fine", "rejected": " world"} for i in range(3)]  # 4 tokens
    path, src = built(tmp_path, rows)
    with pytest.raises(DataError) as e:
        make_loader(src, TOK, kind="pairwise", batch_size=2, max_length=4, length_buckets=(8,), on_bad_example="skip")
    assert str(e.value) == (
        f"no usable example in {path}: 3 examples, all bad; first: {path}:1: prompt has 4 tokens, >= max_length=4: "
        "no completion token would remain; raise max_length (or set max_prompt_length, or use "
        "truncation_mode='keep_end'); all too long for max_length=4: raise data.max_length"
    )


def test_truncated_examples_counted_and_logged_once(tmp_path, caplog):
    rows = [{"prompt": "hello", "chosen": " fine" * k, "rejected": " world"} for k in (1, 4, 2, 5, 1)]
    path, src = built(tmp_path, rows)  # chosen: k + 3 tokens
    kw = dict(kind="pairwise", batch_size=5, shuffle=False, num_epochs=1, max_length=6, length_buckets=(8,))
    with caplog.at_level("WARNING", logger="align_jax.data.pipeline"):
        ds, skips = make_loader(src, TOK, **kw)
        make_loader(src, TOK, **kw)  # cached: not logged again
    assert (skips.num_skipped, skips.num_truncated, skips.truncated_sources) == (0, 2, [f"{path}:2", f"{path}:4"])
    assert [r.getMessage() for r in caplog.records] == [
        f"2 of 5 examples were truncated to max_length=6 (first: {path}:2, {path}:4)"
    ]  # fmt: skip
    (batch,) = list(ds)
    assert batch["chosen_attention_mask"].sum(1).tolist() == [4, 6, 5, 6, 4]


def test_chat_template_failure_is_a_bad_example_with_its_line(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    tok.chat_template += CHAT_TEMPLATE
    user = [{"role": "user", "content": "hello"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": "bad"}]} for a in ("fine", "you", "world")]  # fmt: skip
    rows[1]["prompt"] = [{"role": "system", "content": "how"}, *user]
    path, src = built(tmp_path, rows)
    kw = dict(kind="pairwise", batch_size=2, shuffle=False, num_epochs=1, length_buckets=(16,))
    reason = f"{path}:2: the tokenizer's chat template failed on this conversation: TemplateError: no system role"
    with pytest.raises(DataError, match=f"^{reason}"):
        make_loader(src, tok, **kw)
    ds, skips = make_loader(src, tok, on_bad_example="skip", **kw)
    assert skips.num_skipped == 1 and skips.reasons[0].startswith(reason)
    assert [b["record_index"].tolist() for b in ds] == [[0, 2]]
