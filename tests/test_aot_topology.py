"""benchmarks/aot_topology.py at a tiny size, on the test session's CPU devices (no libtpu): the project's jitted DPO
train step is built from abstract weights and compiled ahead of time on cpu:2 and cpu:8 (all FSDP); the per-device
memory falls as FSDP grows; the analytic FLOP count matches the compiler's `cost_analysis()`; the table row has
its columns."""

import importlib.util
import math
import os
import sys

import jax
import pytest

from util import ROOT


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("aot_topology", os.path.join(ROOT, "benchmarks", "aot_topology.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


aot = _load_benchmark()

# Two layers of the toy model, fp32, one vocabulary chunk (so the log-prob op's scan runs its body once and
# cost_analysis counts every FLOP); the CPU backend's optimisation level 0 halves the compile time and changes
# neither the buffer sizes nor the HLO FLOP count.
TINY = dict(batch=8, seq_len=32, dtype="float32", chunk_size=256, layers=2,
            compiler_options={"xla_backend_optimization_level": 0})
# Measured (per-device cost_analysis flops x devices) / analytic "executed" FLOPs - 1: +2.2% here (DPO, cpu:2: the
# element-wise work the formula leaves out); on one device, two layers: SFT +0.9%, reward model +2.6%, GRPO's loss
# +2.1%, DPO +0.2%, DPO with full remat -3.9% (there XLA merges the log-prob op's logits recompute with the forward).
FLOP_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def results():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices before jax starts"
    out = {}
    for n in (2, 8):
        devices, spec = aot.slice_devices(f"cpu:{n}")
        out[n] = aot.run_config("tiny", "dpo", f"cpu:{n}", (1, n, 1), devices=devices, spec=spec, cost=True,
                                step_time=1.0, **TINY)
    return out


def test_compiles_and_memory_falls_as_fsdp_grows(results):
    r2, r8 = results[2], results[8]
    for r in (r2, r8):
        assert not r.error and r.compile_s > 0
        assert r.args_gib > 0 and r.temp_gib > 0 and r.peak_gib >= r.args_gib
        assert r.alias_gib > 0  # the donated state is aliased to the new state
        assert r.unused_gib == 0  # the DPO step reads every input (the reference too)
    # The state (params, AdamW mu/nu, reference) is split over fsdp: 4x the devices, ~1/4 the argument bytes
    # (ideal 4.0; norms, step and rng stay replicated).
    assert r8.args_gib < r2.args_gib / 3, (r2.args_gib, r8.args_gib)
    assert r8.temp_gib < r2.temp_gib, (r2.temp_gib, r8.temp_gib)  # activations split by batch
    assert r8.peak_gib < r2.peak_gib


def test_analytic_flops_match_cost_analysis(results):
    r = results[2]
    measured = r.cost_flops * 2  # per-device FLOPs x devices
    assert math.isfinite(measured) and measured > 0
    assert abs(r.flops["executed"] / measured - 1) < FLOP_TOLERANCE, (r.flops, measured)


def test_flop_formula_pieces():
    """6 N T for the policy, a third of that for the reference, the remat recompute of one forward."""
    mcfg = aot.model_config("llama3-8b")
    assert abs(mcfg.num_params / 1e9 - 8.03) < 0.01  # Meta-Llama-3-8B
    B, T = 4, 16  # short sequences: the attention term is negligible
    f = aot.step_flops(mcfg, "sft", B, T)
    n_without_table = mcfg.num_params - mcfg.vocab_size * mcfg.hidden_size  # the embedding lookup is no matmul
    assert f["reference"] == 0 and f["remat"] == 0
    assert abs(f["policy"] / (6 * n_without_table * B * T) - 1) < 0.01
    d = aot.step_flops(mcfg, "dpo", B, T, remat="full")
    assert abs(d["reference"] / (d["policy"] / 3) - 1) < 1e-9  # DPO: the reference forward of the same 2B rows
    assert abs(d["remat"] / (2 * (n_without_table - mcfg.vocab_size * mcfg.hidden_size) * 2 * B * T) - 1) < 0.01
    assert d["executed"] == d["model"] + d["remat"] + d["logits_recompute"]


def test_row_has_the_table_columns(results):
    r = results[8]
    cells = aot.row(r)
    assert len(cells) == len(aot.COLUMNS)
    named = dict(zip(aot.COLUMNS, cells))
    assert named["model"] == "tiny (2 of 4 layers)" and named["algorithm"] == "dpo" and named["slice"] == "cpu:8"
    assert named["mesh d,f,t"] == "1,8,1" and named["batch x len"] == "8 x 32"
    assert named["remat, layers"] == "none, unrolled"
    assert named["fits"] == "n/a" and named["HBM GiB"] == "-"  # CPU devices: no HBM figure
    assert float(named["peak GiB"]) == pytest.approx(r.peak_gib, abs=0.01)
    assert named["MFU @ step"] == "-"  # no peak FLOP/s for CPU devices
    table = aot.markdown([results[2], r]).splitlines()
    assert len(table) == 4 and all(line.count("|") == len(aot.COLUMNS) + 1 for line in table)


def test_extrapolation_to_full_depth(results):
    """Two truncated compiles -> the full-depth row, linear in the layer count (how the README's 70B rows are made)."""
    import dataclasses

    r = results[8]
    a = dataclasses.replace(r, layers=1, args_gib=1.0, temp_gib=2.0, peak_gib=3.5)
    b = dataclasses.replace(r, layers=2, args_gib=1.5, temp_gib=3.0, peak_gib=5.0)
    (full,) = aot.extrapolations([b, a, results[2]])  # results[2] is another configuration (mesh): left alone
    assert full.extrapolated and full.layers == 4 == r.total_layers
    assert (full.args_gib, full.temp_gib, full.peak_gib) == pytest.approx((2.5, 5.0, 8.0))
    assert full.flops["model"] > r.flops["model"]  # the FLOPs of all 4 layers
    assert aot.row(full)[0] == "tiny (extrapolated to 4 layers)" and aot.row(full)[-1] == "-"


def test_hbm_refusal_is_parsed():
    """The TPU compiler's out-of-HBM refusal (libtpu 0.0.42's words, from Llama-3-8B DPO on v5e-256) becomes the
    row's figures; so does the wording of other libtpu releases."""
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (16.42G) "
           "exceeds available HBM (15.75G).")
    assert aot.OOM.search(msg)
    assert aot.parse_hbm_refusal(msg) == ("temps", pytest.approx(16.42), pytest.approx(15.75))
    other = "Ran out of memory in memory space hbm. Used 17.29G of 15.48G hbm. Exceeded hbm capacity by 1.81G."
    assert aot.parse_hbm_refusal(other) == ("total", pytest.approx(17.29), pytest.approx(15.48))
    assert aot.parse_hbm_refusal("some other error") is None


def test_lora_step_holds_adapters_state_and_the_base_once():
    """LoRA (benchmarks/memory.py's builder): the state is the adapters and their AdamW moments only; the base
    weights are one argument (the reference is made from them in the step, not passed again); with a precomputed
    reference the batch carries the log-probs instead."""
    devices, spec = aot.slice_devices("cpu:1")
    kw = dict(batch=8, seq_len=32, dtype="float32", chunk_size=256, layers=2)
    built = aot.build_step("tiny", "dpo", devices, (1, 1, 1), lora_rank=4, **kw)
    state, batch, ref, frozen = built.args
    n_adapter = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    n_base = sum(math.prod(x.shape) for x in jax.tree.leaves(frozen))
    c = built.mcfg
    D, F, H, K, E, L = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                        c.num_hidden_layers)
    assert n_adapter == L * 4 * ((D + H * E) + 2 * (D + K * E) + (H * E + D) + 2 * (D + F) + (F + D))
    n_opt = sum(math.prod(x.shape) for x in jax.tree.leaves(state["opt_state"]))
    assert 2 * n_adapter <= n_opt <= 2 * n_adapter + 4  # mu, nu and step counters: no moment of a base weight
    assert ref is None and n_base == built.num_params - n_adapter
    kw["compiler_options"] = TINY["compiler_options"]
    full = aot.run_config("tiny", "dpo", "cpu:1", (1, 1, 1), devices=devices, spec=spec, **kw)
    lora = aot.run_config("tiny", "dpo", "cpu:1", (1, 1, 1), devices=devices, spec=spec, lora_rank=4, **kw)
    pre = aot.run_config("tiny", "dpo", "cpu:1", (1, 1, 1), devices=devices, spec=spec, lora_rank=4,
                         live_reference=False, **kw)
    # full: params + mu + nu + reference = 4 copies of the weights; LoRA: the base once, adapters 3 times
    base_gib = n_base * 4 / aot.GIB
    assert full.args_gib > 3.9 * base_gib and lora.args_gib < 1.5 * base_gib, (full.args_gib, lora.args_gib, base_gib)
    assert pre.args_gib < lora.args_gib + 1e-3 and not pre.error


def test_fresh_arguments_make_a_step_that_learns():
    """`fresh_arguments` (benchmarks/memory.py --run, gpu_check.py) gives the state a fresh LoRA run starts from:
    LoRA B and AdamW's moments zero, step 0. Step 0's loss is exactly ln 2 (the policy is its own reference), and
    every update is applied: LoRA B leaves zero and the loss falls at each step (random second moments, as
    memory.py once drew them, are negative: sqrt -> NaN, every update skipped, B stuck at zero and the loss at ln 2)."""
    devices, _ = aot.slice_devices("cpu:1")
    built = aot.build_step("tiny", "dpo", devices, (1, 1, 1), batch=2, seq_len=32, dtype="float32", chunk_size=256,
                           layers=2, lora_rank=4)
    state, batch, ref, frozen = aot.fresh_arguments(built)
    names = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
    lora_b = [x for n, x in names.items() if "_b']" in n]
    assert len(lora_b) == len(names) // 2 and all(float(abs(x).max()) > 0 for n, x in names.items() if "_a']" in n)
    assert lora_b and all(float(abs(x).max()) == 0 for x in lora_b)
    assert all(float(abs(x).max()) == 0 for x in jax.tree.leaves(state["opt_state"]))
    assert int(state["step"]) == 0 and int(batch["chosen_completion_mask"].sum()) == 2 * 16
    fn, _, plan_gib = aot.compile_planned(built)
    assert 0 < plan_gib < 1
    losses = []
    for _ in range(3):
        state, m = fn(state, batch, ref, frozen)
        assert float(m["nonfinite"]) == 0
        losses.append(float(m["loss"]))
    assert int(state["step"]) == 3
    assert losses[0] == pytest.approx(math.log(2), abs=1e-7)
    assert losses[0] > losses[1] > losses[2], losses  # each applied update lowers the loss (a skipped one would not)
    b_after = [x for p, x in jax.tree_util.tree_leaves_with_path(state["params"]) if "_b']" in jax.tree_util.keystr(p)]
    assert all(float(abs(x).max()) > 0 for x in b_after)


def test_profile_classes_ops_by_their_hlo():
    """benchmarks/xla_profile.py's op classes, on an HLO module in the compiler's text form: a fusion holding a dot
    is a matrix product, one of only copies/bitcasts a copy, one rooted in a reduce a reduction, the rest
    element-wise; plain instructions by their opcode."""
    spec = importlib.util.spec_from_file_location("xla_profile", os.path.join(ROOT, "benchmarks", "xla_profile.py"))
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    hlo = """HloModule m
%fc.mm (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %neg = f32[4,8]{1,0} negate(%p0)
  ROOT %d = f32[4,2]{1,0} dot(%neg, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%fc.cp (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %b = f32[4,8]{0,1} bitcast(%p0)
  ROOT %c = f32[8,4]{1,0} copy(%b)
}
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
%fc.red (p0: f32[4,8]) -> f32[4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %e = f32[4,8]{1,0} exponential(%p0)
  %z = f32[] constant(0)
  ROOT %r = f32[4]{0} reduce(%e, %z), dimensions={1}, to_apply=%add
}
%fc.ew (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[4,8]{1,0} tanh(%p0)
}
ENTRY %main (x: f32[4,8], w: f32[8,2]) -> f32[4,2] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,2]{1,0} parameter(1)
  %fusion.1 = f32[4,2]{1,0} fusion(%x, %w), kind=kOutput, calls=%fc.mm
  %fusion.2 = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fc.cp
  %fusion.3 = f32[4]{0} fusion(%x), kind=kInput, calls=%fc.red
  %fusion.4 = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fc.ew
  %dot.9 = f32[4,2]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %transpose.2 = f32[8,4]{0,1} transpose(%x), dimensions={1,0}
  ROOT %tuple = (f32[4,2]{1,0}, f32[4]{0}) tuple(%fusion.1, %fusion.3)
}
"""
    k = prof.classify(hlo)
    assert [k[n] for n in ("fusion.1", "fusion.2", "fusion.3", "fusion.4", "dot.9", "transpose.2")] == [
        "matmul", "copy/transpose", "reduction", "elementwise fusion", "matmul", "copy/transpose"]


def test_profile_self_times_subtract_nested_ops():
    """benchmarks/xla_profile.py: an op that contains others on its thread (the sampler's while loop) keeps only its
    own time; ops on another thread are not nested; times are per run (microseconds in, seconds out)."""
    spec = importlib.util.spec_from_file_location("xla_profile", os.path.join(ROOT, "benchmarks", "xla_profile.py"))
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    ev = lambda name, ts, dur, tid=1: {"name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}  # noqa: E731
    events = [ev("while.1", 0, 100), ev("dot.1", 10, 20), ev("fusion.2", 40, 10), ev("fusion.3", 5, 10, tid=2),
              ev("while.1", 200, 100), ev("dot.1", 250, 30)]
    t = prof.self_times(events, runs=2)
    assert {k: round(v * 1e6, 6) for k, v in t.items()} == {"while.1": 70.0, "dot.1": 25.0, "fusion.2": 5.0,
                                                           "fusion.3": 5.0}


def test_dpo_benchmark_useful_flops_by_hand():
    """benchmarks/dpo_throughput.py's useful FLOPs (issue 16's roofline target counts real tokens only): per
    sequence of n tokens, the policy's 3 x (2 x matmul weights x n + 4 L H E n^2 + 2 D V (n - 1)) and, with a live
    reference, one more forward; by hand on a small Llama shape, for a pair of 3 + 2 and 3 + 4 tokens."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("dpo_throughput",
                                                      os.path.join(ROOT, "benchmarks", "dpo_throughput.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    D, F, L, V, H, K, E = 16, 40, 2, 50, 4, 2, 4
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F,
              num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=K, head_dim=E, tie_word_embeddings=True)
    rows = [{"prompt_ids": [5] * 3, "chosen_ids": [6] * 2, "rejected_ids": [7] * 4}]
    weights = L * (2 * D * H * E + 2 * D * K * E + 3 * D * F)  # q, o; k, v; gate, up, down
    fwd = lambda n: 2 * weights * n + 4 * L * H * E * n * n + 2 * D * V * (n - 1)  # noqa: E731
    assert bench.useful_flops(hf, rows, live_reference=False) == 3 * (fwd(5) + fwd(7))
    assert bench.useful_flops(hf, rows, live_reference=True) == 4 * (fwd(5) + fwd(7))
