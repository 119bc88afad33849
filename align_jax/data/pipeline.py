"""Grain input pipeline: TFDS data source -> shuffled, sharded, tokenized, bucket-padded numpy batches.

    ds, skips = make_loader(source, tokenizer, kind="pairwise", batch_size=8, seed=0, max_length=512)
    it = iter(ds)                    # grain DatasetIterator
    batch = next(it)
    state = it.get_state()           # ... later: it = iter(ds); it.set_state(state) -> the same next batch

The pipeline (Grain's dataset API)::

    MapDataset.source(source)[shard_index::shard_count]   # this process's shard (ShardByJaxProcess by default)
      .shuffle(seed)                                      # reshuffled each epoch (seed + epoch)
      .repeat(num_epochs)                                 # None = forever
      .to_iter_dataset()
      .map(decode + tokenize)                             # align_jax.data.tokenize, TRL 1.x semantics
      .filter(bad examples: raise DataError, or skip and count in `skips`)
      [FirstFitPackIterDataset]                           # SFT packing=True
      .batch(batch_size, drop_remainder, batch_fn=collate) # right-pad to a length bucket
      [ThreadPrefetchIterDataset]                         # prefetch > 0

Tokenization runs on the consumer side of ``to_iter_dataset`` (one thread; with ``prefetch`` one background
thread), because Hugging Face fast tokenizers are not safe to call from several threads at once. Everything is a
deterministic function of (data, seed, shard), so ``get_state``/``set_state`` -- or Orbax with
``grain.checkpoint.CheckpointHandler`` (grain 0.2.18; it saves ``process_{i}-of-{n}.json`` per process) --
resumes with exactly the next batch. ``skips`` counts the bad examples met by all iterators of the dataset
so far.

Shapes: a batch is padded (right, with ``pad_token_id``; masks 0) to the smallest ``length_buckets`` entry
>= its longest sequence, so a jitted step compiles once per bucket. A last partial batch (``drop_remainder=
False``, for eval) is padded with rows of ``example_weight`` 0. Batches (numpy, int32 unless noted):

* pairwise: ``chosen_input_ids, chosen_attention_mask, chosen_completion_mask [B,L]`` and the same three
  ``rejected_*`` (one L for both), ``label_probs [B]`` f32 (soft label, 1.0 for hard labels),
  ``example_weight [B]`` f32.
* groupwise: ``input_ids, attention_mask, completion_mask [B,K,L]``, ``ranks [B,K]`` (-1 on padding),
  ``scores [B,K]`` f32, ``group_mask [B,K]``, ``example_weight [B]``. K = ``group_size`` (a larger group is a
  bad example), or the largest group of the batch when ``group_size`` is None (then shapes vary).
* sft: ``input_ids, attention_mask, completion_mask, segment_ids, positions [B,L]``, ``example_weight [B]``.
  ``segment_ids`` numbers the examples of a row 1, 2, ... (0 = pad) and ``positions`` restart at 0 for each;
  without packing each row holds one example (segment 1). Packing: first-fit into ``max_length`` rows, with
  ``batch_size`` open bins.
* prompt_only: ``prompt_ids, prompt_mask [B,Lp]`` LEFT-padded, ``example_weight [B]``; host-side object arrays
  ``prompt_text`` (the prompt as in the data: a string or a list of messages) and ``extra`` (dict of the
  record's other fields, e.g. the answer a reward function needs). Prompts are truncated to their last
  ``max_prompt_length`` (or ``max_length``) tokens; Lp is bucketed like L.

Sharding: slicing by process happens before shuffling, so each process reads only its own ``1/process_count``
of the records (sizes differ by at most one). With a finite ``num_epochs``, processes may then yield different
numbers of batches; prefer ``num_epochs=None`` (step-based training) on several hosts.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from align_jax.data import formats, tokenize
from align_jax.data.formats import InvalidRecord, SkipLog


# ---------------------------------------------------------------------------------------------- decoding


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def decode_record(record: dict) -> dict:
    """A TFDS record (bytes / numpy) -> python values (str, list, float)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bytes):
            out[k] = v.decode("utf-8")
        elif isinstance(v, (list, np.ndarray)) and k == "responses":
            out[k] = [_str(x) for x in v]
        elif isinstance(v, (list, np.ndarray)):
            out[k] = [x.item() if hasattr(x, "item") else x for x in v]
        elif hasattr(v, "item"):
            out[k] = v.item()
        else:
            out[k] = v
    return out


class _Bad:
    """Marker flowing through the pipeline in place of an example that failed to tokenize."""

    def __init__(self, message: str):
        self.message = message


def _tokenize_record(indexed_record, *, kind, tokenizer, cfg, group_size):
    index, record = indexed_record
    ex = decode_record(record)
    source = ex.get("source", "?")
    try:
        out = tokenize.TOKENIZERS[kind](ex, tokenizer, cfg)
        if kind == "groupwise" and group_size is not None and len(out["input_ids"]) > group_size:
            raise InvalidRecord(f"group of {len(out['input_ids'])} responses > group_size={group_size}")
    except InvalidRecord as e:
        return _Bad(f"{source}: {e}")
    if kind == "pairwise":
        out["record_index"] = np.int32(index)  # position in the data source (keys precomputed per-example values)
    return out


def _keep(x, skips: SkipLog) -> bool:
    if isinstance(x, _Bad):
        skips.bad(x.message)  # raises DataError in raise mode
        return False
    return True


# ---------------------------------------------------------------------------------------------- collation


def bucket_length(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"sequence of {n} tokens is longer than the largest length bucket {buckets[-1]}")


def pad_right(seqs: list[np.ndarray], length: int, value: int, rows: int) -> np.ndarray:
    out = np.full((rows, length), value, np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def pad_left(seqs: list[np.ndarray], length: int, value: int, rows: int) -> np.ndarray:
    out = np.full((rows, length), value, np.int32)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, length - len(s) :] = s
    return out


def _weights(n: int, rows: int) -> np.ndarray:
    w = np.zeros((rows,), np.float32)
    w[:n] = 1.0
    return w


def collate_pairwise(examples, *, batch_size, buckets, pad_id):
    n = len(examples)
    length = bucket_length(
        max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples), buckets
    )
    out = {}
    for side in ("chosen", "rejected"):
        ids = [e[f"{side}_input_ids"] for e in examples]
        out[f"{side}_input_ids"] = pad_right(ids, length, pad_id, batch_size)
        out[f"{side}_attention_mask"] = pad_right([np.ones_like(s) for s in ids], length, 0, batch_size)
        out[f"{side}_completion_mask"] = pad_right(
            [e[f"{side}_completion_mask"] for e in examples], length, 0, batch_size
        )
    label_probs = np.ones((batch_size,), np.float32)
    label_probs[:n] = [e["label_prob"] for e in examples]
    out["label_probs"] = label_probs
    out["example_weight"] = _weights(n, batch_size)
    index = np.full((batch_size,), -1, np.int32)
    index[:n] = [e["record_index"] for e in examples]
    out["record_index"] = index  # -1 on padding rows
    return out


def collate_groupwise(examples, *, batch_size, buckets, pad_id, group_size):
    n = len(examples)
    k = group_size or max(len(e["input_ids"]) for e in examples)
    length = bucket_length(max(len(s) for e in examples for s in e["input_ids"]), buckets)
    ids = np.full((batch_size, k, length), pad_id, np.int32)
    attn = np.zeros((batch_size, k, length), np.int32)
    comp = np.zeros((batch_size, k, length), np.int32)
    ranks = np.full((batch_size, k), -1, np.int32)
    scores = np.zeros((batch_size, k), np.float32)
    group_mask = np.zeros((batch_size, k), np.int32)
    for b, e in enumerate(examples):
        for j, (s, m) in enumerate(zip(e["input_ids"], e["completion_mask"])):
            ids[b, j, : len(s)] = s
            attn[b, j, : len(s)] = 1
            comp[b, j, : len(s)] = m
        g = len(e["input_ids"])
        ranks[b, :g], scores[b, :g], group_mask[b, :g] = e["ranks"], e["scores"], 1
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": comp,
        "ranks": ranks,
        "scores": scores,
        "group_mask": group_mask,
        "example_weight": _weights(n, batch_size),
    }


def collate_sft(examples, *, batch_size, buckets, pad_id):
    n = len(examples)
    if "input_ids_segment_ids" in examples[0]:  # packed rows
        seg = [e["input_ids_segment_ids"] for e in examples]
        length = bucket_length(max(int(np.count_nonzero(s)) for s in seg), buckets)
        segment_ids = pad_right([s[:length] for s in seg], length, 0, batch_size)
        positions = pad_right([e["input_ids_positions"][:length] for e in examples], length, 0, batch_size)
        ids = pad_right([e["input_ids"][:length] for e in examples], length, pad_id, batch_size)
        ids[segment_ids == 0] = pad_id
        comp = pad_right([e["completion_mask"][:length] for e in examples], length, 0, batch_size)
        comp[segment_ids == 0] = 0
    else:
        length = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
        ids = pad_right([e["input_ids"] for e in examples], length, pad_id, batch_size)
        comp = pad_right([e["completion_mask"] for e in examples], length, 0, batch_size)
        segment_ids = pad_right([np.ones_like(e["input_ids"]) for e in examples], length, 0, batch_size)
        positions = pad_right(
            [np.arange(len(e["input_ids"]), dtype=np.int32) for e in examples], length, 0, batch_size
        )
    return {
        "input_ids": ids,
        "attention_mask": (segment_ids > 0).astype(np.int32),
        "completion_mask": comp,
        "segment_ids": segment_ids,
        "positions": positions,
        "example_weight": _weights(n, batch_size),
    }


def collate_prompt_only(examples, *, batch_size, buckets, pad_id):
    n = len(examples)
    ids = [e["prompt_ids"] for e in examples]
    length = bucket_length(max(len(s) for s in ids), buckets)
    prompt_text = np.empty((batch_size,), object)
    extra = np.empty((batch_size,), object)
    for i in range(batch_size):
        prompt_text[i] = examples[i]["prompt_text"] if i < n else ""
        extra[i] = examples[i]["extra"] if i < n else {}
    return {
        "prompt_ids": pad_left(ids, length, pad_id, batch_size),
        "prompt_mask": pad_left([np.ones_like(s) for s in ids], length, 0, batch_size),
        "prompt_text": prompt_text,
        "extra": extra,
        "example_weight": _weights(n, batch_size),
    }


_COLLATE = {
    "pairwise": collate_pairwise,
    "groupwise": collate_groupwise,
    "sft": collate_sft,
    "prompt_only": collate_prompt_only,
}


# ---------------------------------------------------------------------------------------------- loader


def _resolve_source(source, split: str):
    if hasattr(source, "as_data_source"):  # a TFDS builder
        return source.as_data_source(split)
    if isinstance(source, str):  # a built dataset directory
        from align_jax.data.builders import load_source

        return load_source(source, split)
    return source  # any random-access source: __len__ + __getitem__


_KIND_FIELD = {"pairwise": "chosen", "groupwise": "responses", "sft": "completion", "prompt_only": "extra"}


def _check_kind(source, kind: str) -> None:
    if len(source) and _KIND_FIELD[kind] not in source[0]:
        raise ValueError(f"the data source has fields {sorted(source[0])}, not those of kind={kind!r}")


def make_loader(
    source,
    tokenizer,
    *,
    kind: str,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    length_buckets: tuple[int, ...] | None = (64, 128, 256, 512),
    group_size: int | None = None,
    packing: bool = False,
    drop_remainder: bool = True,
    shard_by_process: bool = True,
    shard_options: grain.sharding.ShardOptions | None = None,
    on_bad_example: str = "raise",
    pad_token_id: int | None = None,
    prefetch: int = 0,
    read_options: grain.ReadOptions | None = None,
    split: str = "train",
) -> tuple[grain.IterDataset, SkipLog]:
    """Grain dataset of padded numpy batches (see the module docstring); returns ``(dataset, skips)``.

    ``source``: a TFDS data source (``builder.as_data_source(split)``), a builder, or a built dataset directory.
    ``max_length`` defaults to the largest bucket; ``length_buckets=None`` means one bucket, ``max_length``.
    ``shard_options`` overrides the per-process sharding (``ShardByJaxProcess`` when ``shard_by_process``).
    ``pad_token_id`` defaults to the tokenizer's pad token, else its EOS (as TRL).
    ``read_options``: threads / buffer reading records ahead (default 4 threads, ``max(64, 4 * batch_size)``
    records); ``prefetch``: batches made ahead in a background thread (0 = none).
    """
    if kind not in formats.KINDS:
        raise ValueError(f"kind must be one of {formats.KINDS}, got {kind!r}")
    if packing and kind != "sft":
        raise ValueError("packing is only for kind='sft'")
    if max_length is None and not length_buckets:
        raise ValueError("set max_length or length_buckets")
    buckets = tuple(sorted(length_buckets)) if length_buckets else (max_length,)
    max_length = max_length or buckets[-1]
    limit = (max_prompt_length or max_length) if kind == "prompt_only" else max_length
    if buckets[-1] < limit:
        raise ValueError(f"the largest length bucket {buckets[-1]} is < max_length {limit}")
    cfg = tokenize.TokenizeConfig(max_length, max_prompt_length, truncation_mode)
    skips = SkipLog(on_bad_example)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess() if shard_by_process else grain.sharding.NoSharding()

    source = _resolve_source(source, split)
    _check_kind(source, kind)
    ds = grain.MapDataset.source(source).map_with_index(lambda i, record: (i, record))
    if shard_options.shard_count > 1:
        ds = ds[shard_options.shard_index :: shard_options.shard_count]
    if len(ds) == 0:
        raise ValueError(f"no examples in shard {shard_options.shard_index} of {shard_options.shard_count}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(64, 4 * batch_size))
    it_ds = ds.to_iter_dataset(read_options)
    it_ds = it_ds.map(
        functools.partial(_tokenize_record, kind=kind, tokenizer=tokenizer, cfg=cfg, group_size=group_size)
    )
    it_ds = it_ds.filter(functools.partial(_keep, skips=skips))
    if packing:
        it_ds = grain.experimental.FirstFitPackIterDataset(
            it_ds,
            length_struct={"input_ids": max_length, "completion_mask": max_length},
            num_packing_bins=batch_size,
            shuffle_bins=False,
        )
    collate = functools.partial(_COLLATE[kind], batch_size=batch_size, buckets=buckets, pad_id=pad_token_id)
    if kind == "groupwise":
        collate = functools.partial(collate, group_size=group_size)
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    if prefetch:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
    return it_ds, skips
