"""Where a compiled program's time goes, per XLA op: a DPO or GRPO train step (the step `train()` runs,
`aot_topology.build_step`: loss + gradients + AdamW, state donated) or the KV-cache sampler (`generate`: prefill +
decode loop), traced with `jax.profiler`, the trace read back with xprof, every op's self time summed and classed
by its HLO instruction (matrix products vs element-wise fusions vs copies and transposes vs reductions vs the
rest), against the program's analytic matmul FLOPs and this machine's matmul peak.

    pip install xprof                                    # reads the trace (not in requirements.txt: profiling only)
    JAX_PLATFORMS=cpu python benchmarks/xla_profile.py   # DPO: 110M Llama, 4 pairs x 80 tokens, fp32, live reference
    JAX_PLATFORMS=cpu python benchmarks/xla_profile.py --what grpo     # the GRPO update of grpo_throughput.py
    JAX_PLATFORMS=cpu python benchmarks/xla_profile.py --what sample   # sampler_speed.py's model, batch 64, 128 new

Defaults per `--what`:
* `dpo`: the shape of `benchmarks/dpo_throughput.py`'s 110M side (4 pairs, rows padded to the 80-token bucket,
  fp32, a live reference as TRL uses, no remat), on one CPU device; the batch is random tokens with the second half
  of each sequence the completion (`aot_topology.fresh_arguments`).
* `grpo`: `benchmarks/grpo_throughput.py`'s update: its 2.97M Llama, 64 rows (8 prompts x 8 completions) of 56
  tokens of which 32 are the completion, fp32, beta 0 (no reference), no remat.
* `sample`: `benchmarks/sampler_speed.py`'s default Llama (hidden 256, 4 layers, MLP 688, vocab 2048; random
  weights), `--pairs` is the batch (default 64), prompts of 32 tokens, 128 new tokens greedy (no stop), fp32.
  Matmul FLOPs: 2 x the non-embedding weights per new token (the decode's products; prefill not counted).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from align_jax.hostinfo import host_line  # noqa: E402
os.environ.setdefault("JAX_PLATFORMS", "cpu")

CLASSES = ("matmul", "elementwise fusion", "copy/transpose", "reduction", "other")


def classify(hlo_text: str) -> dict:
    """instruction name -> class, from the compiled module's HLO text: a dot, or a fusion/call whose computation
    holds a dot or convolution, is "matmul"; copies, transposes and fusions of only those are "copy/transpose";
    reduce(-window) and fusions rooted in one are "reduction"; other fusions "elementwise fusion"."""
    comps, cur = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None and "=" in line:
            comps[cur].append(line.strip())

    def ops_of(comp, seen=None):
        seen = seen or set()
        if comp in seen or comp not in comps:
            return []
        seen.add(comp)
        out = []
        for ln in comps[comp]:
            m = re.search(r"=\s*[^ ]+(?:\{[^}]*\})?\s+([\w\-]+)\(", ln)
            if m:
                out.append(m.group(1))
            for c in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", ln):
                out += ops_of(c, seen)
        return out

    kinds = {}
    for comp, lines in comps.items():
        for ln in lines:
            m = re.match(r"^(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\(", ln)
            if not m:
                continue
            name, op = m.groups()
            inner = []
            for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", ln):
                inner += ops_of(c)
            body = set(inner) | {op}
            if body & {"dot", "convolution"} or (op == "custom-call" and "matmul" in ln.lower()):
                kinds[name] = "matmul"
            elif op in ("copy", "transpose") or (inner and set(inner) <= {"copy", "transpose", "parameter",
                                                                          "bitcast", "reshape", "broadcast"}):
                kinds[name] = "copy/transpose"
            elif body & {"reduce", "reduce-window"}:
                kinds[name] = "reduction"
            elif op == "fusion":
                kinds[name] = "elementwise fusion"
            else:
                kinds[name] = "other"
    return kinds


def trace_ops(run, steps: int, kinds: dict) -> tuple[collections.Counter, float]:
    """Runs `run()` (blocking) `steps` times under `jax.profiler.trace`; returns ({op: self seconds per run} for the
    ops named in `kinds`, wall seconds per run)."""
    import jax
    from xprof.convert import raw_to_tool_data

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(steps):
                run()
        wall = (time.perf_counter() - t0) / steps
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    if isinstance(data, bytes):
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return self_times([e for e in json.loads(data)["traceEvents"] if e.get("ph") == "X" and e.get("name") in kinds],
                      steps), wall


def self_times(events, runs: int) -> collections.Counter:
    """{op name: self seconds per run} of trace events (dicts with name, pid, tid, ts, dur in microseconds): an op
    that contains others on its thread (a while loop, a conditional) keeps only the time not spent in them."""
    out = collections.Counter()
    threads = collections.defaultdict(list)
    for e in events:
        threads[(e.get("pid"), e.get("tid"))].append(e)
    for evs in threads.values():
        stack = []  # [end, name] of the enclosing ops
        for e in sorted(evs, key=lambda e: (e["ts"], -e.get("dur", 0))):
            dur = e.get("dur", 0)
            while stack and stack[-1][0] <= e["ts"]:
                stack.pop()
            if stack:
                out[stack[-1][1]] -= dur / 1e6 / runs
            out[e["name"]] += dur / 1e6 / runs
            stack.append([e["ts"] + dur, e["name"]])
    return out


def train_step_program(a):
    """(run, kinds, matmul FLOPs per run, title) of a DPO or GRPO train step."""
    import jax

    import aot_topology as t

    if a.what == "grpo":
        import grpo_throughput

        t.MODELS.setdefault("grpo-bench", grpo_throughput.MODEL)
    model = a.model or {"dpo": "llama-110m", "grpo": "grpo-bench"}[a.what]
    rows, seq = a.pairs or {"dpo": 4, "grpo": 64}[a.what], a.seq or {"dpo": 80, "grpo": 56}[a.what]
    devices, _ = t.slice_devices("cpu:1")
    kw = dict(live_reference=a.reference == "live") if a.what == "dpo" else dict(completion_len=a.completion)
    built = t.build_step(model, a.what, devices, (1, 1, 1), batch=rows, seq_len=seq, remat="none", dtype=a.dtype,
                         **kw)
    compiled = built.fn.lower(*built.args).compile()
    state, batch, ref, *frozen = t.fresh_arguments(built)
    box = [state]

    def run():
        box[0], _ = compiled(box[0], batch, ref, *frozen)
        jax.block_until_ready(box[0])

    f = t.step_flops(built.mcfg, a.what, rows, seq, completion_len=a.completion)
    flops = f["policy"] + (f["reference"] if a.what == "dpo" and a.reference == "live" else 0)
    what = (f"{rows} pairs x {seq} tokens, reference {a.reference}" if a.what == "dpo"
            else f"{rows} rows x {seq} tokens ({a.completion} completion), beta 0")
    return run, classify(compiled.as_text()), flops, f"{model} {a.what.upper()} train step, {what}, {a.dtype}"


def sample_program(a):
    """(run, kinds, matmul FLOPs per run, title) of the sampler: `generate`, greedy, `a.new` new tokens."""
    import jax
    import numpy as np
    from flax import nnx

    import sampler_speed as ss
    from align_jax.models import from_hf_config, init_model

    gen = ss.generate_module
    sa = argparse.Namespace(vocab=2048, hidden=256, mlp=688, layers=4, heads=4, kv_heads=2, prompt=32, new=a.new,
                            batch=a.pairs or 64, seed=0)
    model = init_model(from_hf_config(ss.hf_config(sa), param_dtype=a.dtype), seed=0)
    ids, mask = ss.prompts(sa)
    compiled_text = {}
    inner = gen._generate_jit

    def spy(*args, **kw):  # the HLO of the program `generate` runs
        if not compiled_text:
            compiled_text["hlo"] = inner.lower(*args, **kw).compile().as_text()
        return inner(*args, **kw)

    def run():
        out = gen.generate(model, ids, mask, max_new_tokens=sa.new, greedy=True, eos_ids=(sa.vocab + 1,))
        jax.block_until_ready(out.completion_ids)

    gen._generate_jit = spy
    try:
        run()
    finally:
        gen._generate_jit = inner
    n_weights = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) - sa.vocab * sa.hidden
    flops = 2 * n_weights * sa.batch * sa.new
    title = (f"sampler (generate, greedy), batch {sa.batch}, prompt {sa.prompt}, {sa.new} new tokens, Llama hidden "
             f"{sa.hidden} x {sa.layers} layers, vocab {sa.vocab}, {a.dtype}; {np.prod(ids.shape)} prompt places")
    return run, classify(compiled_text["hlo"]), flops, title


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", choices=["dpo", "grpo", "sample"], default="dpo")
    p.add_argument("--model", default="", help="dpo/grpo: an aot_topology model (default: llama-110m / grpo-bench)")
    p.add_argument("--pairs", type=int, default=0, help="dpo: pairs (4); grpo: rows (64); sample: batch (64)")
    p.add_argument("--seq", type=int, default=0, help="dpo/grpo: tokens per row (80 / 56)")
    p.add_argument("--completion", type=int, default=32, help="grpo: completion tokens per row")
    p.add_argument("--new", type=int, default=128, help="sample: new tokens")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reference", choices=["live", "precomputed"], default="live")
    p.add_argument("--steps", type=int, default=3, help="traced runs (after 2 untraced warm-up runs)")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)

    from bench_util import matmul_peak

    run, kinds, flops, title = (sample_program if a.what == "sample" else train_step_program)(a)
    for _ in range(2):  # warm-up (compiles)
        run()
    per_op, wall = trace_ops(run, a.steps, kinds)
    by_class = collections.Counter()
    for name, s in per_op.items():
        by_class[kinds[name]] += s
    traced = sum(by_class.values())
    peak = matmul_peak()
    print(host_line(with_jax=True))
    print(f"{title}; 1 CPU device ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}); matmul peak (XLA fp32 "
          f"1024^3) {peak / 1e9:.0f} GFLOP/s")
    print(f"wall time per run under the profiler {wall:.3f} s; op time found in the trace {traced:.3f} s per run "
          f"({len(per_op)} distinct ops); matmul FLOPs {flops / 1e9:.2f} G per run = "
          f"{flops / wall / 1e9:.0f} GFLOP/s = {flops / wall / peak:.0%} of peak\n")
    print("| op class | s per run | share of op time |\n|---|---|---|")
    for c in CLASSES:
        print(f"| {c} | {by_class[c]:.4f} | {by_class[c] / max(traced, 1e-12):.1%} |")
    mm = by_class["matmul"]
    if mm:
        print(f"\nmatrix products alone: {flops / mm / 1e9:.0f} GFLOP/s = {flops / mm / peak:.0%} of peak "
              f"(model FLOPs over the time spent in ops that hold a dot)")
    print(f"\ntop {a.top} ops by self time:\n| op | class | ms per run |\n|---|---|---|")
    for name, s in per_op.most_common(a.top):
        print(f"| {name} | {kinds[name]} | {s * 1e3:.2f} |")


if __name__ == "__main__":
    main()
