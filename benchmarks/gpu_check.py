"""The GPU checks of issue 16 (item 7) in one call: each part in a fresh process with its own time limit, results
as JSON lines and one summary table at the end.

    python benchmarks/gpu_check.py --out /tmp/gpu             # every part (one H200: ~8 min with compiles)
    python benchmarks/gpu_check.py --smoke                    # tiny shapes on the CPU: checks this script only

Parts:
- `peak`: the GPU's bf16 matrix rate, [8192, 8192] x [8192, 8192] on random data, median of 10 after 3 warm-ups.
- `attention`: logits of a 110M Llama (bf16) with `config.model.attention` = "cudnn" (cuDNN flash attention) vs
  "xla" (the einsum path), padded and packed batches, on real tokens.
- `dpo`: the train step `train()` runs (`benchmarks/aot_topology.build_step`: loss + gradients + AdamW, state
  donated) for a Llama-3.2-1B shape (1.24 B parameters), bf16 parameters and activations, 8 pairs x 1024 tokens,
  layers scanned, from a fresh run's state (random weights, AdamW moments zero), for attention xla / cudnn and
  the reference precomputed / live. Seconds per step = the median of 3 timed blocks of 5 steps after 3 warm-up
  steps. MFU = model FLOPs / step time / the datasheet's dense bf16 peak (989 TFLOP/s for H100/H200 SXM); also
  against the measured `peak`. Model FLOPs (`aot_topology.step_flops`): 6 x matmul parameters x tokens for the
  policy (+ 2 x for a live reference's forward) + attention's q·k and p·v over the full T x T square + the LM
  head on the scored tokens; rematerialisation is not counted (it is work the model does not need).
- `sampler`: `benchmarks/sampler_speed.py --batches 8,16,32,64 --new 128` on the GPU with the same 1B shape in
  bf16 on both sides (transformers `generate` on torch CUDA, greedy and sampled).
- `grpo`: `benchmarks/grpo_throughput.py --sides jax` (its tiny Llama, 8 prompts x 8 samples, 32 new tokens):
  seconds per step split into generation, scoring, reference/old log-probs and update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATASHEET_BF16 = 989e12  # H100 / H200 SXM dense bf16 FLOP/s (NVIDIA's datasheet, without sparsity)
PARTS = ("peak", "attention", "dpo", "sampler", "grpo")
LIMITS = {"peak": 40, "attention": 80, "dpo": 200, "sampler": 300, "grpo": 90}  # seconds per part


def _jax(smoke: bool):
    if smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import jax

    return jax


def part_peak(a) -> dict:
    jax = _jax(a.smoke)
    import jax.numpy as jnp

    n = 512 if a.smoke else 8192
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    for _ in range(3):
        f(x, y).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x, y).block_until_ready()
        times.append(time.perf_counter() - t)
    return {"n": n, "bf16_flops": 2 * n ** 3 / statistics.median(times), "device": jax.devices()[0].device_kind}


def part_attention(a) -> dict:
    _jax(a.smoke)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import aot_topology as t
    from align_jax.models import init_model

    impl = "dot_product" if a.smoke else "cudnn"
    cfg = t.model_config("tiny" if a.smoke else "llama-110m", dtype="bfloat16")
    B, T = 4, 256
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, T)), jnp.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, T // 2:] = 0
    seg = np.repeat(np.arange(1, 5), T // 4)[None].repeat(B, 0).astype(np.int32)
    seg[2, -T // 8:] = 0
    out = {}
    for name in ("xla", impl):
        m = init_model(cfg.replace(attention=name), seed=0)
        fwd = nnx.jit(lambda m, kw: m(ids, **kw))
        out[name] = [np.asarray(fwd(m, dict(attention_mask=jnp.asarray(mask)))),
                     np.asarray(fwd(m, dict(segment_ids=jnp.asarray(seg))))]
    res = {"implementation": impl}
    for i, (what, real) in enumerate((("padded", mask != 0), ("packed", seg != 0))):
        ref, got = out["xla"][i][real], out[impl][i][real]
        res[what] = {"max_abs": float(np.abs(got - ref).max()), "ref_max_abs": float(np.abs(ref).max()),
                     "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                     "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())}
    return res


def part_dpo(a) -> dict:
    jax = _jax(a.smoke)
    import aot_topology as t

    model, batch, seq = ("tiny", 2, 64) if a.smoke else ("llama3.2-1b", 8, 1024)
    devices, _ = t.slice_devices("cpu:1" if a.smoke else "gpu:1")
    fast = "dot_product" if a.smoke else "cudnn"
    rows = []
    for attention, live in (("xla", False), (fast, False), (fast, True)):
        try:
            built = t.build_step(model, "dpo", devices, (1, 1, 1), batch=batch, seq_len=seq, remat="none",
                                 dtype="bfloat16", scan=True, live_reference=live, attention=attention)
            compiled, compile_s, plan = t.compile_planned(built)
            state, b, ref, *frozen = t.fresh_arguments(built)
            losses = []
            for _ in range(3):
                state, m = compiled(state, b, ref, *frozen)
                losses.append(float(m["loss"]))
            blocks = []
            for _ in range(3):
                t1 = time.perf_counter()
                for _ in range(5):
                    state, m = compiled(state, b, ref, *frozen)
                jax.block_until_ready((state, m))
                blocks.append((time.perf_counter() - t1) / 5)
                losses.append(float(m["loss"]))
            sec = statistics.median(blocks)
            f = t.step_flops(built.mcfg, "dpo", batch, seq)
            flops = f["policy"] + (f["reference"] if live else 0)
            rows.append({"attention": attention, "reference": "live" if live else "precomputed",
                         "params_b": built.num_params / 1e9, "compile_s": compile_s, "planned_gib": plan,
                         "step_s": sec, "blocks_s": blocks, "model_flops": flops, "model_tflops_s": flops / sec / 1e12,
                         "mfu_datasheet": flops / sec / DATASHEET_BF16, "tokens_per_s": 2 * batch * seq / sec,
                         "losses": losses, "steps_applied": int(state["step"]), "nonfinite": float(m["nonfinite"])})
        except Exception as e:  # noqa: BLE001  (one variant failing must not lose the others)
            rows.append({"attention": attention, "reference": "live" if live else "precomputed",
                         "error": f"{type(e).__name__}: {str(e)[:800]}"})
        print(json.dumps(rows[-1]), flush=True)
    return {"model": model, "pairs": batch, "seq_len": seq, "rows": rows}


def part_sampler(a) -> dict:
    if a.smoke:
        cmd = ["--hidden", "64", "--mlp", "128", "--layers", "2", "--heads", "4", "--kv_heads", "2", "--vocab", "256",
               "--batches", "2,4", "--new", "8", "--prompt", "8", "--repeats", "1"]
    else:
        cmd = ["--hidden", "2048", "--mlp", "8192", "--layers", "16", "--heads", "32", "--kv_heads", "8",
               "--vocab", "128256", "--batches", "8,16,32,64", "--new", "128", "--prompt", "64", "--repeats", "1",
               "--device", "cuda", "--dtype", "bfloat16"]
    env = dict(os.environ, JAX_PLATFORMS="cpu") if a.smoke else None
    p = subprocess.run([sys.executable, os.path.join(HERE, "sampler_speed.py"), *cmd], capture_output=True,
                       text=True, env=env)
    print(p.stdout[-6000:], p.stderr[-3000:] if p.returncode else "", flush=True)
    if p.returncode:
        raise RuntimeError(f"sampler_speed.py exit {p.returncode}")
    return {"table": [ln for ln in p.stdout.splitlines() if ln.startswith("|")]}


def part_grpo(a) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "grpo_throughput.py"), "--sides", "jax", "--betas", "0.04"]
    if a.smoke:
        cmd += ["--prompts", "2", "--generations", "2", "--new", "8", "--steps", "1", "--warmup", "1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu") if a.smoke else None
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(p.stdout[-6000:], p.stderr[-3000:] if p.returncode else "", flush=True)
    if p.returncode:
        raise RuntimeError(f"grpo_throughput.py exit {p.returncode}")
    return {"output": p.stdout.splitlines()[-30:]}


def summary(results: dict) -> str:
    out = []
    peak = results.get("peak", {}).get("bf16_flops")
    if peak:
        out.append(f"bf16 matmul peak (measured): {peak / 1e12:.0f} TFLOP/s on {results['peak']['device']}")
    att = results.get("attention")
    if att and "padded" in att:
        out.append(f"attention {att['implementation']} vs xla logits (real tokens): padded rel-L2 "
                   f"{att['padded']['rel_l2']:.2e}, packed {att['packed']['rel_l2']:.2e}; argmax agreement "
                   f"{att['padded']['argmax_agree']:.4f} / {att['packed']['argmax_agree']:.4f}")
    dpo = results.get("dpo")
    if dpo and "rows" in dpo:
        out.append(f"\nDPO step, {dpo['model']}, {dpo['pairs']} pairs x {dpo['seq_len']} tokens, bf16:\n"
                   "| attention | reference | compile s | plan GiB | step s | tokens/s | model TFLOP/s | MFU (989) |"
                   " % of measured peak | losses first -> last |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in dpo["rows"]:
            if "error" in r:
                out.append(f"| {r['attention']} | {r['reference']} | error: {r['error'][:120]} |")
                continue
            pct = f"{r['model_tflops_s'] * 1e12 / peak:.0%}" if peak else "-"
            out.append(f"| {r['attention']} | {r['reference']} | {r['compile_s']:.1f} | {r['planned_gib']:.1f} | "
                       f"{r['step_s']:.4f} | {r['tokens_per_s']:.0f} | {r['model_tflops_s']:.0f} | "
                       f"{r['mfu_datasheet']:.1%} | {pct} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    if results.get("sampler", {}).get("table"):
        out.append("\nsampler (1B shape, bf16, 128 new tokens):\n" + "\n".join(results["sampler"]["table"]))
    if results.get("grpo", {}).get("output"):
        out.append("\nGRPO step split:\n" + "\n".join(results["grpo"]["output"][-14:]))
    for k, v in results.items():
        if isinstance(v, dict) and "error" in v:
            out.append(f"{k}: FAILED {v['error']}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", default="", help="directory for results.json and one log per part")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = globals()[f"part_{a.child}"](a)
        print("RESULT " + json.dumps(res), flush=True)
        return
    out = a.out or os.path.join("/tmp", "gpu_check")
    os.makedirs(out, exist_ok=True)
    results = {}
    for part in a.parts.split(","):
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", part] + (["--smoke"] if a.smoke else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMITS[part] * (3 if a.smoke else 1))
            log = p.stdout + p.stderr
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            results[part] = json.loads(lines[-1][7:]) if lines else {"error": f"exit {p.returncode}: "
                                                                             + log[-1500:]}
        except subprocess.TimeoutExpired as e:
            log = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
            results[part] = {"error": f"over its {LIMITS[part]} s limit: " + log[-1500:]}
        results[part]["seconds"] = time.time() - t0
        with open(os.path.join(out, f"{part}.log"), "w") as f:
            f.write(log)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"[{part}] {results[part]['seconds']:.0f} s{' FAILED' if 'error' in results[part] else ''}", flush=True)
    print(summary(results))


if __name__ == "__main__":
    main()
