"""Padding-free preference batches: the sequences of a batch's pairs (or groups) first-fit packed into rows of
`max_length` tokens, kept apart by segment ids and per-segment positions, so the model's forward runs on real
tokens instead of a [2B, bucket] grid of mostly padding. The batch (which pairs, in which order) is exactly the
padded path's; only the layout of the forward changes, and the loss sees the padded layout again (`unpack`).

A packed batch holds, for N = 2B sequences of B pairs (chosen then rejected) or N = B·K group slots:

    packed_input_ids, packed_segment_ids, packed_positions   [R, L]  segments 1, 2, ... per row, 0 = padding
    <side>_token_index                                       [B, L]  (groupwise: token_index [B, K, L])
    <side>_attention_mask, <side>_completion_mask            [B, L]  the padded path's masks at length L

`token_index[i, t]` is the flat index (row·L + column) of token t of sequence i in its micro-batch's packed rows,
counted within the process (0 where the sequence has no token t; those places are masked). With gradient
accumulation over A micro-batches (rows i, i+A, ... of every array: `train.step`) each micro-batch's sequences
are packed into their own rows, which the collator interleaves the same way. R is rounded up to a multiple of
`row_multiple` (micro-batches x local devices) and of N / 8 (`row_granularity`), so a run compiles its step for
a few row counts (at most 8, in practice 2-3 around the mean), not one per batch.
"""

from __future__ import annotations

import numpy as np

PACKED_PREFIX = "packed_"


def first_fit_decreasing(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bin packing of sequences of `lengths` into rows of `capacity` tokens: the longest first, each into the first
    row with room (deterministic: ties in input order). Returns (row of each sequence, its offset in the row,
    number of rows)."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit a row of {capacity}")
    row = np.zeros(len(lengths), np.int64)
    offset = np.zeros(len(lengths), np.int64)
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        for r, u in enumerate(used):
            if u + n <= capacity:
                break
        else:
            r = len(used)
            used.append(0)
        row[i], offset[i] = r, used[r]
        used[r] += n
    return row, offset, len(used)


ROW_COUNTS = 8  # packed batches of N sequences use at most this many distinct row counts (compiled shapes)


def row_granularity(num_sequences: int, row_multiple: int) -> int:
    """Row counts are multiples of this: of `row_multiple` (micro-batches x local devices) and at least
    N / ROW_COUNTS, so a run compiles its step for a few row counts, not one per batch."""
    g = max(row_multiple, -(-num_sequences // ROW_COUNTS))
    return -(-g // row_multiple) * row_multiple


def pack_batch(seqs: list[np.ndarray], micro: list[int], *, length: int, pad_id: int, micro_batches: int,
               row_multiple: int) -> dict:
    """Packs `seqs` (N sequences in batch order; an empty one takes no room) into rows of `length` tokens:
    `seqs[i]` goes into the rows of micro-batch `micro[i]`, whose j-th row is row j·A + a of the result
    (A = micro_batches). Returns the packed arrays [R, length] and `token_index` [N, length] (rows counted within
    the micro-batch)."""
    A = micro_batches
    placed = {}
    rows_per_micro = 1
    for a in range(A):
        members = [i for i in range(len(seqs)) if micro[i] == a]
        row, off, n = first_fit_decreasing([len(seqs[i]) for i in members], length)
        placed[a] = (members, row, off)
        rows_per_micro = max(rows_per_micro, n)
    R = A * rows_per_micro
    R = -(-R // row_granularity(len(seqs), row_multiple)) * row_granularity(len(seqs), row_multiple)
    ids = np.full((R, length), pad_id, np.int32)
    seg = np.zeros((R, length), np.int32)
    pos = np.zeros((R, length), np.int32)
    token_index = np.zeros((len(seqs), length), np.int32)
    count = np.zeros(R, np.int32)  # segments per row so far
    for a, (members, row, off) in placed.items():
        for i, r, o in zip(members, row, off):
            s = seqs[i]
            n = len(s)
            if n == 0:
                continue
            g = int(r) * A + a  # the row in the interleaved batch
            count[g] += 1
            ids[g, o:o + n] = s
            seg[g, o:o + n] = count[g]
            pos[g, o:o + n] = np.arange(n)
            token_index[i, :n] = int(r) * length + o + np.arange(n)
    return {"packed_input_ids": ids, "packed_segment_ids": seg, "packed_positions": pos, "token_index": token_index}
