"""Hugging Face datasets saved on disk (save_to_disk directories, Parquet, Arrow) read with pyarrow only.

Fixtures: tests/fixtures/hf_datasets/, written by tests/fixtures/make_hf_datasets.py with the `datasets` library;
each dataset has a `<name>.jsonl` holding the same rows, which must give exactly the same batches.
"""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_jax.data.builders import build_dataset
from align_jax.data.formats import DataError
from align_jax.data.pipeline import decode_record, make_loader
from test_data_tokenize import make_tokenizer

HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf_datasets")
TOK = make_tokenizer()


def hf(name):
    return os.path.join(HF, name)


def rows_of(builder, split="train"):
    src = builder.as_data_source(split)
    return [decode_record(src[i]) for i in range(len(src))]


def batches(builder, kind="pairwise", split="train"):
    ds, skips = make_loader(builder.as_data_source(split), TOK, kind=kind, batch_size=2, shuffle=False,
                            num_epochs=1, drop_remainder=False, length_buckets=(16, 32))  # fmt: skip
    assert skips.num_skipped == 0
    return list(ds)


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def jsonl_of(tmp_path, name, rows=None):
    """The JSONL twin of a fixture (or ``rows`` of it) in tmp_path."""
    with open(hf(f"{name}.jsonl")) as f:
        lines = f.readlines()
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(lines if rows is None else [lines[i] for i in rows]))
    return str(path)


@pytest.mark.parametrize("spec,twin,rows,kind", [
    ("pairs_standard", "pairs_standard", None, "pairwise"),  # Dataset.save_to_disk, 2 shards
    ("pairs_standard.parquet", "pairs_standard", None, "pairwise"),
    ("pairs_standard_stream.arrow", "pairs_standard", None, "pairwise"),  # Arrow IPC stream format
    ("pairs_conversational.parquet", "pairs_conversational", None, "pairwise"),
    ("pairs_conversational_file.arrow", "pairs_conversational", None, "pairwise"),  # Arrow IPC file format
    ("pairs_conversational_dict", "pairs_conversational", range(5), "pairwise"),  # DatasetDict: train by default
    ("pairs_conversational_dict:test", "pairs_conversational", range(5, 7), "pairwise"),
    ("sft_messages", "sft_messages", None, "sft"),
])  # fmt: skip
def test_hf_data_gives_the_batches_of_the_same_rows_as_jsonl(tmp_path, spec, twin, rows, kind):
    builder, stats = build_dataset(hf(spec), kind=kind, data_dir=str(tmp_path / "tfds"))
    expected, _ = build_dataset(jsonl_of(tmp_path, twin, rows), kind=kind, data_dir=str(tmp_path / "tfds"))
    n = len(rows) if rows is not None else sum(1 for _ in open(hf(f"{twin}.jsonl")))
    assert stats.num_examples == {"train": n} and stats.num_skipped == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "source"} for r in rs]  # noqa: E731
    assert strip(rows_of(builder)) == strip(rows_of(expected))
    assert_same_batches(batches(builder, kind), batches(expected, kind))


def test_sources_name_the_arrow_file_and_row(tmp_path):
    builder, _ = build_dataset(hf("pairs_standard"), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    shard0, shard1 = (hf(f"pairs_standard/data-0000{i}-of-00002.arrow") for i in (0, 1))
    assert [r["source"] for r in rows_of(builder)] == [
        f"{shard0}:row 0", f"{shard0}:row 1", f"{shard0}:row 2", f"{shard1}:row 0", f"{shard1}:row 1"
    ]  # fmt: skip
    # A null (here: chosen_prob missing from row 1) is an absent field: the default 1.0.
    assert [r["chosen_prob"] for r in rows_of(builder)] == [0.75, 1.0, 1.0, 0.5, 0.8999999761581421]
    builder, _ = build_dataset(hf("pairs_conversational_dict:test"), kind="pairwise", data_dir=str(tmp_path / "t"))
    test_file = hf("pairs_conversational_dict/test/data-00000-of-00001.arrow")
    assert [r["source"] for r in rows_of(builder)] == [f"{test_file}:row 0", f"{test_file}:row 1"]


def test_bad_row_named_by_file_and_row(tmp_path):
    data = hf("pairs_bad/data-00000-of-00001.arrow")
    reason = (f"{data}:row 2: field 'prompt': message 0 has an unknown role 'human' (roles found: human); "
              "use one of system, user, assistant, tool")  # fmt: skip
    with pytest.raises(DataError) as e:
        build_dataset(hf("pairs_bad"), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    assert str(e.value) == reason
    builder, stats = build_dataset(hf("pairs_bad"), kind="pairwise", data_dir=str(tmp_path / "tfds"),
                                   on_bad_example="skip")  # fmt: skip
    assert stats.num_skipped == 1 and stats.skipped_reasons == [reason] and stats.num_examples == {"train": 3}
    assert [r["source"] for r in rows_of(builder)] == [f"{data}:row {i}" for i in (0, 1, 3)]

    table = pa.table({"prompt": ["hello", "hello", "how"], "chosen": [" fine", None, " you"],
                      "rejected": [" bad", " bad", " you"]})  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(DataError, match=f"^{tmp_path / 't.parquet'}:row 1: missing field 'chosen'$"):
        build_dataset(str(tmp_path / "t.parquet"), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    _, stats = build_dataset(str(tmp_path / "t.parquet"), kind="pairwise", data_dir=str(tmp_path / "tfds"),
                             on_bad_example="skip")  # fmt: skip
    log = stats.skipped_reasons
    assert stats.num_examples == {"train": 1} and log[0] == f"{tmp_path / 't.parquet'}:row 1: missing field 'chosen'"
    assert log[1].startswith(f"{tmp_path / 't.parquet'}:row 2: 'chosen' and 'rejected' are identical")


def test_directory_and_split_errors(tmp_path):
    with pytest.raises(DataError) as e:
        build_dataset(hf("pairs_conversational_dict:validation"), kind="pairwise", data_dir=str(tmp_path))
    assert str(e.value) == (f"{hf('pairs_conversational_dict')}: this DatasetDict has no split 'validation' "
                            f"(splits: train, test); select one as '{hf('pairs_conversational_dict')}:<split>'")
    with pytest.raises(DataError, match="not a Hugging Face dataset saved with save_to_disk"):
        build_dataset(str(tmp_path), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=f"^{tmp_path / 'empty.parquet'}: no examples: the table has no rows$"):
        build_dataset(str(tmp_path / "empty.parquet"), kind="prompt_only", data_dir=str(tmp_path / "tfds"))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=f"^{tmp_path / 'junk.arrow'}: not a readable Arrow IPC file"):
        build_dataset(str(tmp_path / "junk.arrow"), kind="prompt_only", data_dir=str(tmp_path / "tfds"))


def test_fingerprint_covers_the_data_files_of_a_directory(tmp_path):
    ds_dir = tmp_path / "pairs"
    shutil.copytree(hf("pairs_standard"), ds_dir)
    first, _ = build_dataset(str(ds_dir), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    again, _ = build_dataset(str(ds_dir), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    assert again.data_dir == first.data_dir
    shard = ds_dir / "data-00001-of-00002.arrow"
    table = pa.ipc.open_stream(pa.OSFile(str(shard))).read_all()  # read into memory, then rewrite
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(0, 1))  # drop the last row of the second shard
    changed, stats = build_dataset(str(ds_dir), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    assert changed.data_dir != first.data_dir and stats.num_examples == {"train": 4}
    assert [r["prompt"] for r in rows_of(changed)] == ["hello", "how are you ?", "hello world", "hello 1"]
