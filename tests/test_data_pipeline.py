"""Grain pipeline: seeds, sharding, checkpoint/restore, bucketing, packing, bad examples at tokenization time."""

import json

import grain
import numpy as np
import pytest
from etils import epath

from align_jax.data.builders import build_dataset
from align_jax.data.formats import DataError
from align_jax.data.pipeline import make_loader
from test_data_tokenize import BOS, EOS, FINE, HELLO, PAD, VOCAB, WORLD, make_tokenizer

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
