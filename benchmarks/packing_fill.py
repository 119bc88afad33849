"""How much of a preference batch's forward is real tokens, padded to a length bucket vs packed into rows of
max_length (align_jax.data.packing, the default for DPO / ORPO / reward models / offline GRPO) or of 2 x max_length
(`data.packing_length`). Counts token places only (no
model is run): the forward's matmul work is proportional to them; attention in a packed row spans the whole row
(its cross-sequence scores are masked, not skipped).

    python benchmarks/packing_fill.py

Length distributions (sequence = prompt + response, chosen and rejected of B pairs = 2B sequences):
* `bench-80`: benchmarks/dpo_throughput.py's 110M rows (prompt 16-48, responses 8-32 tokens; max_length 80);
* `hh-512`: a long-tailed HH-RLHF-like mix (prompt 20-300, responses 10-200; max_length 512);
* `toy-64`: the embedded toy task's DPO pairs (20-45 tokens; max_length 64), tokenized by the toy tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from align_jax.data.packing import first_fit_decreasing, row_granularity  # noqa: E402


def toy_lengths() -> np.ndarray:
    """Token counts (prompt + response) of the toy task's chosen and rejected sequences, in pairs [n, 2]."""
    import tempfile

    from align_jax.data.toy import generate, load_tokenizer, read_jsonl

    from align_jax.data import tokenize

    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        pairs = read_jsonl(generate(d, n_sft=1, n_groups=1, n_prompts=1, n_eval=1, n_eval_pairs=1)["pairs"])
    cfg = tokenize.TokenizeConfig(64, None, "keep_start")  # configs/dpo.py: max_length 64
    from align_jax.data.formats import parse_pairwise
    from align_jax.data.pipeline import decode_record

    out = [tokenize.tokenize_pairwise(decode_record(parse_pairwise(p)), tok, cfg) for p in pairs]
    return np.asarray([[len(e["chosen_input_ids"]), len(e["rejected_input_ids"])] for e in out])


def fill(lengths_Bx2_batches, row_length: int, bucket: int, row_multiple: int = 1) -> tuple[float, float]:
    """(real / padded places, real / packed places) over the batches, rows of `row_length` tokens."""
    real = padded = packed = 0
    for lens in lengths_Bx2_batches:
        seqs = lens.T.reshape(-1)  # chosen then rejected
        real += int(seqs.sum())
        padded += seqs.size * int(-(-seqs.max() // bucket) * bucket)
        _, _, rows = first_fit_decreasing(seqs, row_length)
        g = row_granularity(seqs.size, row_multiple)
        packed += int(-(-rows // g) * g) * row_length
    return real / padded, real / packed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--bucket", type=int, default=16, help="the padded path's length buckets: multiples of this")
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    def synthetic(b, prompt, resp):
        p = rng.integers(*prompt, size=(args.batches, b, 1))
        return list(p + rng.integers(*resp, size=(args.batches, b, 2)))

    toy = toy_lengths()
    print(f"{'data':>8} {'pairs/batch':>11} {'padded fill':>12} {'packed fill':>12} {'places padded/packed':>21}"
          f" {'packed fill, rows 2x':>21} {'padded/packed 2x':>17}")
    for name, max_length, batches in (
            [("bench-80", 80, lambda b: synthetic(b, (16, 49), (8, 33)))]
            + [("hh-512", 512, lambda b: synthetic(b, (20, 301), (10, 201)))]
            + [("toy-64", 64, lambda b: [toy[rng.integers(0, len(toy), b)] for _ in range(args.batches)])]):
        for b in (4, 8, 16):
            data = batches(b)
            pad, pk = fill(data, max_length, args.bucket)
            _, pk2 = fill(data, 2 * max_length, args.bucket)  # data.packing_length = 2 x max_length
            print(f"{name:>8} {b:>11} {pad:>12.3f} {pk:>12.3f} {pk / pad:>20.2f}x {pk2:>21.3f} {pk2 / pad:>16.2f}x")


if __name__ == "__main__":
    main()
