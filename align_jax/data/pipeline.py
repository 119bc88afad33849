"""Grain input pipeline: TFDS data source -> checked, shuffled, sharded, tokenized, bucket-padded numpy batches.

    ds, skips = make_loader(source, tokenizer, kind="pairwise", batch_size=8, seed=0, max_length=512)
    it = iter(ds)                    # grain DatasetIterator
    batch = next(it)
    state = it.get_state()           # ... later: it = iter(ds); it.set_state(state) -> the same next batch

Validation pass (``check_source``): before the pipeline is built, every record of the source is tokenized once,
in record order, with the same functions and options as the pipeline. A bad example (e.g. a prompt of
``>= max_length`` tokens, a chat template that fails) raises its ``DataError("file:line: ...")`` there in raise
mode; in skip mode its index is left out of the pipeline. So ``skips`` (a ``SkipLog``) holds, before the first
batch, the exact number of bad examples of the whole source (each counted once, the same in every run and after a
restart), their first reasons, and ``num_truncated``: legal examples cut by ``max_length`` /
``max_prompt_length`` (logged once as "N of M examples were truncated ..."). A source without any usable example
raises ``DataError("no usable example in <files>: ...")`` instead of looping forever. The pass is memoized
in-process (key: the built dataset's directory and split, the tokenizer's name_or_path, size, chat template and
EOS, the tokenize options, kind, group_size) and stored as ``tokenize_check-{split}-{hash}.json`` in the TFDS
dataset's directory, so re-created (eval) loaders and restarted runs do not redo it. Other sources (e.g. a list
of records) are checked at every call. A progress bar is shown for more than ``PROGRESS_MIN_RECORDS`` records
(on a terminal).

The pipeline (Grain's dataset API)::

    MapDataset.source(good record indices)              # the records that passed the check
      .map(read record)                                   # (original index, record): record_index keys per-example
      [shard_index::shard_count]                          # finite passes: this process's strided shard
      .shuffle(seed)                                      # reshuffled each epoch (seed + epoch)
      .repeat(num_epochs)                                 # None = forever
      [block of each global batch]                        # streams: this process's rows of each global batch
      .to_iter_dataset()
      .map(decode + tokenize)                             # align_jax.data.tokenize, TRL 1.x semantics
      [FirstFitPackIterDataset]                           # SFT packing=True
      .batch(batch_size, drop_remainder, batch_fn=collate) # right-pad to a length bucket (preference data with
                                                          # packing=True: pack the batch's sequences into rows)
      [ThreadPrefetchIterDataset]                         # prefetch > 0

Tokenization runs on the consumer side of ``to_iter_dataset`` (one thread; with ``prefetch`` one background
thread), because Hugging Face fast tokenizers are not safe to call from several threads at once. Everything is a
deterministic function of (data, seed, shard), so ``get_state``/``set_state`` -- or Orbax with
``grain.checkpoint.CheckpointHandler`` (grain 0.2.18; it saves ``process_{i}-of-{n}.json`` per process) --
resumes with exactly the next batch.

Shapes: a batch is padded (right, with ``pad_token_id``; masks 0) to the smallest ``length_buckets`` entry
>= its longest sequence, so a jitted step compiles once per bucket. A last partial batch (``drop_remainder=
False``, for eval) is padded with rows of ``example_weight`` 0. Batches (numpy, int32 unless noted):

* pairwise: ``chosen_input_ids, chosen_attention_mask, chosen_completion_mask [B,L]`` and the same three
  ``rejected_*`` (one L for both), ``label_probs [B]`` f32 (soft label, 1.0 for hard labels),
  ``example_weight [B]`` f32. Packed (``packing=True``): ``packed_input_ids, packed_segment_ids,
  packed_positions [R, max_length]`` and ``<side>_token_index [B, max_length]`` instead of ``<side>_input_ids``
  (masks at L = max_length; ``align_jax.data.packing``). Groupwise the same with ``token_index [B,K,L]``.
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

Sharding. An endless stream (``num_epochs=None``, training) is shuffled the same way on every process, read in
global batches of ``process_count * batch_size`` records, and each process takes its block of rows of each
global batch: the global batches (process blocks in process order) are those one process would read, so a run
sees the same data on any number of hosts. A finite pass (``num_epochs`` set, e.g. evaluation) gives each
process a strided ``1/process_count`` of the good records before shuffling (sizes differ by at most one). Either
way each process reads only its own records; the validation pass reads all records on every process, so
``skips`` is the same everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile

import grain
import numpy as np
import tqdm

from align_jax.data import formats, packing, tokenize
from align_jax.data.formats import DataError, InvalidRecord, SkipLog

logger = logging.getLogger(__name__)

PROGRESS_MIN_RECORDS = 10_000  # the validation pass shows a progress bar above this many records
_CHECK_VERSION = "1"  # bump when the tokenization (what is bad, what is truncated) changes
_READ_CHUNK = 1024  # records read at once by the validation pass


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


def _tokenize(ex: dict, *, kind, tokenizer, cfg, group_size) -> dict:
    """The tokenized example of a decoded record; a bad example raises ``DataError("source: reason")``."""
    try:
        out = tokenize.TOKENIZERS[kind](ex, tokenizer, cfg)
        if kind == "groupwise" and group_size is not None and len(out["input_ids"]) > group_size:
            raise InvalidRecord(
                f"group of {len(out['input_ids'])} responses > group_size={group_size}; raise group_size"
            )
    except InvalidRecord as e:
        raise DataError(f"{ex.get('source', '?')}: {e}") from None
    return out


def _example(indexed_record, **kw) -> dict:
    """The pipeline's map: a tokenized example of a record that passed the validation pass."""
    index, record = indexed_record
    out = _tokenize(decode_record(record), **kw)
    del out["truncated"]
    if kw["kind"] == "pairwise":
        out["record_index"] = np.int32(index)  # position in the data source (keys precomputed per-example values)
    return out


# ---------------------------------------------------------------------------------------------- validation pass


@dataclasses.dataclass
class Check:
    """Result of the validation pass over a source of ``num_records`` records.

    ``bad``: indices of the bad records (ascending), ``reasons``: the first ``MAX_REASONS`` of their messages;
    ``num_truncated`` / ``truncated``: examples cut by max_length / max_prompt_length and the first
    ``MAX_TRUNCATED`` of their sources; ``files``: the files the records come from (first-seen order).
    """

    num_records: int
    bad: list[int] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)
    num_truncated: int = 0
    truncated: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)

    def good_indices(self) -> np.ndarray:
        keep = np.ones((self.num_records,), bool)
        keep[self.bad] = False
        return np.flatnonzero(keep)

    def skip_log(self, on_bad_example: str) -> SkipLog:
        return SkipLog(on_bad_example, len(self.bad), list(self.reasons), self.num_truncated, list(self.truncated))


def _read(source, indices: list[int]) -> list:
    getitems = getattr(source, "__getitems__", None)  # TFDS sources read a batch of records at once
    return list(getitems(indices)) if getitems else [source[i] for i in indices]


def check_source(source, tokenizer, *, kind: str, cfg: tokenize.TokenizeConfig, group_size: int | None = None,
                 on_bad_example: str = "skip") -> Check:
    """Tokenizes every record of ``source`` once (a plain loop, in record order).

    In raise mode the first bad example raises its ``DataError``; in skip mode bad examples are collected.
    """
    n = len(source)
    check, files = Check(n), {}
    kw = dict(kind=kind, tokenizer=tokenizer, cfg=cfg, group_size=group_size)
    quiet = None if n > PROGRESS_MIN_RECORDS else True  # None: a bar on a terminal only
    with tqdm.tqdm(total=n, desc="checking examples", unit=" examples", disable=quiet) as bar:
        for start in range(0, n, _READ_CHUNK):
            indices = list(range(start, min(n, start + _READ_CHUNK)))
            for i, record in zip(indices, _read(source, indices)):
                ex = decode_record(record)
                where = ex.get("source", "?")
                files.setdefault(where.rsplit(":", 1)[0])
                try:
                    out = _tokenize(ex, **kw)
                except DataError as e:
                    if on_bad_example == "raise":
                        raise
                    check.bad.append(i)
                    if len(check.reasons) < formats.MAX_REASONS:
                        check.reasons.append(str(e))
                    continue
                if out["truncated"]:
                    check.num_truncated += 1
                    if len(check.truncated) < formats.MAX_TRUNCATED:
                        check.truncated.append(where)
            bar.update(len(indices))
    check.files = list(files)
    return check


_CHECKS: dict[tuple, Check] = {}  # in-process memo of validation passes


def _check_key(source, tokenizer, kind: str, cfg: tokenize.TokenizeConfig, group_size: int | None):
    """What a validation pass depends on; None for a source that is not a built TFDS dataset (not cached)."""
    info = getattr(source, "dataset_info", None)
    if getattr(info, "data_dir", None) is None or getattr(source, "split", None) is None:
        return None
    template = str(getattr(tokenizer, "chat_template", None) or "")
    return (
        _CHECK_VERSION, os.fspath(info.data_dir), str(source.split), kind, group_size, dataclasses.astuple(cfg),
        str(getattr(tokenizer, "name_or_path", "")), len(tokenizer), str(tokenizer.eos_token),
        hashlib.sha256(template.encode()).hexdigest(),
    )  # fmt: skip


def _check_path(key: tuple) -> str:
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    split = "".join(c if c.isalnum() or c in "-_." else "_" for c in key[2])
    return os.path.join(key[1], f"tokenize_check-{split}-{digest}.json")


def _load_check(path: str, num_records: int) -> Check | None:
    try:
        with open(path) as f:
            check = Check(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    return check if check.num_records == num_records else None


def _save_check(path: str, check: Check) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tokenize_check-")
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(check), f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the dataset's other files are readable
        os.replace(tmp, path)  # atomic: processes sharing the directory write the same content
    except OSError as e:  # e.g. a read-only dataset directory: the pass is redone by the next process
        logger.info("could not save the validation pass to %s: %s", path, e)


def _log_check(check: Check, cfg: tokenize.TokenizeConfig) -> None:
    n = check.num_records
    if check.bad:
        logger.warning(
            "skipping %d of %d examples that fail to tokenize; first:\n  %s", len(check.bad), n,
            "\n  ".join(check.reasons),
        )  # fmt: skip
    if check.num_truncated:
        limits = f"max_length={cfg.max_length}"
        if cfg.max_prompt_length:
            limits += f" / max_prompt_length={cfg.max_prompt_length}"
        logger.warning(
            "%d of %d examples were truncated to %s (first: %s)", check.num_truncated, n, limits,
            ", ".join(check.truncated),
        )  # fmt: skip


def validate_source(source, tokenizer, *, kind: str, cfg: tokenize.TokenizeConfig, group_size: int | None = None,
                    on_bad_example: str = "raise") -> Check:
    """``check_source``, memoized (in-process and in the dataset directory) and logged once per process.

    Raises the first bad example's ``DataError`` in raise mode, and ``DataError("no usable example in ...")``
    when every record is bad.
    """
    key = _check_key(source, tokenizer, kind, cfg, group_size)
    check = _CHECKS.get(key) if key else None
    fresh = check is None
    if fresh:
        path = _check_path(key) if key else None
        check = _load_check(path, len(source)) if path else None
        if check is None:
            check = check_source(source, tokenizer, kind=kind, cfg=cfg, group_size=group_size,
                                 on_bad_example=on_bad_example)
            if path:
                _save_check(path, check)
        if key:
            _CHECKS[key] = check
    if check.bad and on_bad_example == "raise":
        raise DataError(check.reasons[0])
    if check.num_records and len(check.bad) == check.num_records:
        hint = "fix the data, or check that it matches kind=" + repr(kind)
        if "max_length" in check.reasons[0]:
            hint = f"all too long for max_length={cfg.max_length}: raise data.max_length"
        files = ", ".join(check.files[:3]) + (f" and {len(check.files) - 3} more" if len(check.files) > 3 else "")
        raise DataError(
            f"no usable example in {files}: {check.num_records} examples, all bad; first: {check.reasons[0]}; {hint}"
        )
    if fresh:
        _log_check(check, cfg)
    return check


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


def collate_pairwise(examples, *, batch_size, buckets, pad_id, packed=None):
    """`packed` = {"length", "micro_batches", "row_multiple"}: the pairs' 2B sequences packed into rows
    (`align_jax.data.packing`) instead of right-padded [B, bucket] arrays per side."""
    n = len(examples)
    if packed:
        length = packed["length"]
        empty = [np.zeros((0,), np.int32)] * (batch_size - n)
        seqs = ([e["chosen_input_ids"] for e in examples] + empty
                + [e["rejected_input_ids"] for e in examples] + empty)
        A = packed["micro_batches"]
        p = packing.pack_batch(seqs, [k % A for k in range(batch_size)] * 2, length=length, pad_id=pad_id,
                               micro_batches=A, row_multiple=packed["row_multiple"])
        out = {k: v for k, v in p.items() if k.startswith(packing.PACKED_PREFIX)}
        out["chosen_token_index"], out["rejected_token_index"] = np.split(p["token_index"], 2)
    else:
        length = bucket_length(
            max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples), buckets
        )
        out = {}
    for side in ("chosen", "rejected"):
        ids = [e[f"{side}_input_ids"] for e in examples]
        if not packed:
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


def collate_groupwise(examples, *, batch_size, buckets, pad_id, group_size, packed=None):
    """`packed`: as `collate_pairwise`, the B·K responses packed into rows (`token_index` [B, K, L])."""
    n = len(examples)
    k = group_size or max(len(e["input_ids"]) for e in examples)
    if packed:
        length = packed["length"]
    else:
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
    out = {"input_ids": ids}
    if packed:
        empty = np.zeros((0,), np.int32)
        seqs = [(e["input_ids"][j] if b < n and j < len(e["input_ids"]) else empty)
                for b, e in enumerate(examples + [None] * (batch_size - n)) for j in range(k)]
        A = packed["micro_batches"]
        p = packing.pack_batch(seqs, [b % A for b in range(batch_size) for _ in range(k)], length=length,
                               pad_id=pad_id, micro_batches=A, row_multiple=packed["row_multiple"])
        out = {key: v for key, v in p.items() if key.startswith(packing.PACKED_PREFIX)}
        out["token_index"] = p["token_index"].reshape(batch_size, k, length)
    return {
        **out,
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


def _read_indexed(source, index) -> tuple[int, dict]:
    return int(index), source[int(index)]


def _check_kind(source, kind: str) -> None:
    if len(source) and _KIND_FIELD[kind] not in source[0]:
        raise ValueError(f"the data source has fields {sorted(source[0])}, not those of kind={kind!r}")


def _batch_block(ds: grain.MapDataset, shard: int, shards: int, batch_size: int) -> grain.MapDataset:
    """Process `shard`'s rows of an endless stream read in global batches of `shards * batch_size` records: rows
    [shard * batch_size, (shard + 1) * batch_size) of each. The processes' batches, concatenated in process
    order (as `make_array_from_process_local_data` assembles them), are exactly the batches one process would
    read with the global batch size: a run's data does not depend on its number of hosts."""
    B = shards * batch_size

    def global_index(j: int) -> int:
        return (j // batch_size) * B + shard * batch_size + j % batch_size

    return grain.MapDataset.range(len(ds) // shards).map(lambda j: ds[global_index(j)])


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
    micro_batches: int = 1,
    row_multiple: int = 1,
    packing_length: int | None = None,
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

    ``skips``: a ``SkipLog`` filled by the validation pass before this returns (``num_skipped``, ``reasons``,
    ``num_truncated``, ``truncated_sources``); it does not change while the dataset is iterated.
    ``source``: a TFDS data source (``builder.as_data_source(split)``), a builder, or a built dataset directory
    (or any random-access sequence of records, checked at every call).
    ``max_length`` defaults to the largest bucket; ``length_buckets=None`` means one bucket, ``max_length``.
    ``shard_options`` overrides the per-process sharding (``ShardByJaxProcess`` when ``shard_by_process``).
    ``pad_token_id`` defaults to the tokenizer's pad token, else its EOS (as TRL).
    ``read_options``: threads / buffer reading records ahead (default 4 threads, ``max(64, 4 * batch_size)``
    records); ``prefetch``: batches made ahead in a background thread (0 = none).
    ``packing``: sft: several examples per row (``FirstFitPackIterDataset``); pairwise / groupwise: each batch's
    sequences packed into rows of ``packing_length`` tokens (default ``max_length``; longer rows let long
    sequences share a row) (``align_jax.data.packing``), packed separately for each of ``micro_batches``
    (gradient accumulation), rows rounded up to a multiple of ``row_multiple``.
    """
    if kind not in formats.KINDS:
        raise ValueError(f"kind must be one of {formats.KINDS}, got {kind!r}")
    if packing and kind == "prompt_only":
        raise ValueError("packing is for kind='sft', 'pairwise' or 'groupwise'")
    if batch_size % micro_batches or row_multiple % micro_batches:
        raise ValueError(f"batch_size {batch_size} and row_multiple {row_multiple} must be multiples of "
                         f"micro_batches {micro_batches}")
    if max_length is None and not length_buckets:
        raise ValueError("set max_length or length_buckets")
    buckets = tuple(sorted(length_buckets)) if length_buckets else (max_length,)
    max_length = max_length or buckets[-1]
    limit = (max_prompt_length or max_length) if kind == "prompt_only" else max_length
    if buckets[-1] < limit:
        raise ValueError(f"the largest length bucket {buckets[-1]} is < max_length {limit}")
    cfg = tokenize.TokenizeConfig(max_length, max_prompt_length, truncation_mode)
    SkipLog(on_bad_example)  # validates the option
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess() if shard_by_process else grain.sharding.NoSharding()

    source = _resolve_source(source, split)
    _check_kind(source, kind)
    kw = dict(kind=kind, tokenizer=tokenizer, cfg=cfg, group_size=group_size)
    check = validate_source(source, on_bad_example=on_bad_example, **kw)
    skips = check.skip_log(on_bad_example)
    ds = grain.MapDataset.source(check.good_indices()).map(functools.partial(_read_indexed, source))
    shards, shard = shard_options.shard_count, shard_options.shard_index
    if shards > 1 and num_epochs is not None:  # a finite pass: every process its strided share
        ds = ds[shard::shards]
    if len(ds) == 0:
        raise ValueError(f"no examples in shard {shard} of {shards}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if shards > 1 and num_epochs is None:  # a stream: every process its block of each global batch
        ds = _batch_block(ds, shard, shards, batch_size)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(64, 4 * batch_size))
    it_ds = ds.to_iter_dataset(read_options)
    it_ds = it_ds.map(functools.partial(_example, **kw))
    if packing and kind == "sft":
        it_ds = grain.experimental.FirstFitPackIterDataset(
            it_ds,
            length_struct={"input_ids": max_length, "completion_mask": max_length},
            num_packing_bins=batch_size,
            shuffle_bins=False,
        )
    collate = functools.partial(_COLLATE[kind], batch_size=batch_size, buckets=buckets, pad_id=pad_token_id)
    if kind == "groupwise":
        collate = functools.partial(collate, group_size=group_size)
    if packing and kind in ("pairwise", "groupwise"):
        if (packing_length or max_length) < max_length:
            raise ValueError(f"packing_length {packing_length} is < max_length {max_length}")
        collate = functools.partial(collate, packed={"length": packing_length or max_length,
                                                     "micro_batches": micro_batches,
                                                     "row_multiple": row_multiple})
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    if prefetch:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
    return it_ds, skips
