"""Where a DPO train step's time goes, per XLA op: the step `train()` runs (`aot_topology.build_step`: loss +
gradients + AdamW, state donated) traced with `jax.profiler` for a few steps, the trace read back with xprof, every
op's self time summed and classed by its HLO instruction (matrix products vs element-wise fusions vs copies and
transposes vs reductions vs the rest), against the matrix products' analytic FLOPs and this machine's matmul peak.

    pip install xprof                                   # reads the trace (not in requirements.txt: profiling only)
    JAX_PLATFORMS=cpu python benchmarks/dpo_profile.py  # 110M Llama, 4 pairs x 80 tokens, fp32, live reference

Defaults: the shape of `benchmarks/dpo_throughput.py`'s 110M side (4 pairs, its rows padded to the 80-token bucket,
fp32, a live reference as TRL uses, no remat), on one CPU device; the batch is random tokens with the second half
of each sequence the completion (`aot_topology.fresh_arguments`).
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-110m")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq", type=int, default=80)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reference", choices=["live", "precomputed"], default="live")
    p.add_argument("--steps", type=int, default=3, help="traced steps (after 2 untraced warm-up steps)")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)

    import jax
    from xprof.convert import raw_to_tool_data

    import aot_topology as t
    from bench_util import matmul_peak

    devices, _ = t.slice_devices("cpu:1")
    built = t.build_step(a.model, "dpo", devices, (1, 1, 1), batch=a.pairs, seq_len=a.seq, remat="none",
                         dtype=a.dtype, live_reference=a.reference == "live")
    compiled = built.fn.lower(*built.args).compile()
    kinds = classify(compiled.as_text())
    args = t.fresh_arguments(built)
    state, batch, ref, *frozen = args
    for _ in range(2):
        state, m = compiled(state, batch, ref, *frozen)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(a.steps):
                state, m = compiled(state, batch, ref, *frozen)
            jax.block_until_ready(state)
        wall = (time.perf_counter() - t0) / a.steps
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    if isinstance(data, bytes):
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    events = json.loads(data)["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            per_op[e["name"]] += e.get("dur", 0) / 1e6 / a.steps
    by_class = collections.Counter()
    for name, s in per_op.items():
        by_class[kinds[name]] += s
    traced = sum(by_class.values())
    f = t.step_flops(built.mcfg, "dpo", a.pairs, a.seq)
    flops = f["policy"] + (f["reference"] if a.reference == "live" else 0)
    peak = matmul_peak()
    print(f"{a.model} DPO step, {a.pairs} pairs x {a.seq} tokens, {a.dtype}, reference {a.reference}, 1 CPU device "
          f"({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}); matmul peak (XLA fp32 1024^3) {peak / 1e9:.0f} "
          f"GFLOP/s")
    print(f"step wall time under the profiler {wall:.3f} s; op time found in the trace {traced:.3f} s per step "
          f"({len(per_op)} distinct ops); model FLOPs {flops / 1e9:.1f} G per step = "
          f"{flops / wall / 1e9:.0f} GFLOP/s = {flops / wall / peak:.0%} of peak\n")
    print("| op class | s per step | share of op time |\n|---|---|---|")
    for c in CLASSES:
        print(f"| {c} | {by_class[c]:.4f} | {by_class[c] / max(traced, 1e-12):.1%} |")
    mm = by_class["matmul"]
    if mm:
        print(f"\nmatrix products alone: {flops / mm / 1e9:.0f} GFLOP/s = {flops / mm / peak:.0%} of peak "
              f"(model FLOPs over the time spent in ops that hold a dot)")
    print(f"\ntop {a.top} ops by self time:\n| op | class | ms per step |\n|---|---|---|")
    for name, s in per_op.most_common(a.top):
        print(f"| {name} | {kinds[name]} | {s * 1e3:.2f} |")


if __name__ == "__main__":
    main()
