"""New tokens per second: the KV-cache sampler vs recomputing the whole prefix each step vs transformers.

One random Llama (default: hidden 256, 4 layers, 4 heads / 2 kv heads, MLP 688, vocab 2048) is built with
transformers' `LlamaForCausalLM` and saved to a temporary directory (when torch is missing it is built with
`init_model` + `save_pretrained` instead, and the transformers column is skipped with a message); both sides
load the same weights. B left-padded prompts of P tokens (real lengths P/2..P), N new tokens, greedy, a stop
id that never fires (so every row runs N steps). Timed after one warm-up (compile) call; the best of
`--repeats` interleaved rounds (see `run_interleaved`) is reported as B * N / seconds,
with the median alongside (the machine may be shared).

- `kv-cache`: `align_jax.sampling.generate` (jitted prefill + `lax.while_loop` decode with a KV cache; on CPU
              the decode step multiplies by transposed [out, in] copies of the weights, made once per call, see
              `align_jax.sampling.decode`).
- `kv-cache, model layout`: the same sampler with the decode step run by the model's own cached forward
              ([in, out] weights; `generate.TRANSPOSED_DECODE = False`), i.e. the sampler before that change.
- `naive`:    one jitted `lax.fori_loop`; step n runs the full forward over the padded [B, P + N] buffer
              (mask = prompt mask + tokens generated so far) and takes the argmax at position P + n - 1.
- `hf`:       transformers `model.generate(do_sample=False)` (torch CPU, default attention, KV cache), timed
              with torch's default thread count and with 1 thread (less sensitive to a busy machine); the
              speed-up is quoted against the faster of the two.

`--xla_single_thread` runs XLA without its intra-op thread pool (the analogue of torch's 1 thread; on a small
model and a busy machine, pool hand-offs cost more than they save).

    python benchmarks/sampler_speed.py                 # the default moderate config
    python benchmarks/sampler_speed.py --new 128 --batch 16
    python benchmarks/sampler_speed.py --new 128 --batches 8,16,32,64   # one table over batch sizes (issue 16)

`--batches` prints one row per batch size: align-jax greedy and sampled vs transformers `generate` greedy and
sampled (torch at its default thread count), best of `--repeats` interleaved rounds each, with both ratios.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install
if "--xla_single_thread" in sys.argv:  # must be set before jax starts its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from align_jax.models import from_hf_config, init_model, load_pretrained, save_pretrained  # noqa: E402
from align_jax.hostinfo import host_line  # noqa: E402
from align_jax.sampling import generate  # noqa: E402
from bench_util import matmul_peak  # noqa: E402  (benchmarks/bench_util.py)

SAMPLING_ROW = "kv-cache, sampling (T=1, top-k 50, top-p 0.95)"
generate_module = importlib.import_module("align_jax.sampling.generate")  # (the package exports the function)


def hf_config(a) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=a.vocab, hidden_size=a.hidden,
                intermediate_size=a.mlp, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                num_key_value_heads=a.kv_heads, max_position_embeddings=a.prompt + a.new + 8, rms_norm_eps=1e-6,
                hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_checkpoint(a, path: str):
    """Saves a random model; returns the torch model (or None without torch)."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(f"[hf] torch/transformers not importable ({e}); skipping the transformers column")
        save_pretrained(init_model(from_hf_config(hf_config(a)), seed=a.seed), path)
        return None
    torch.manual_seed(a.seed)
    cfg = {k: v for k, v in hf_config(a).items() if k not in ("model_type", "architectures")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def prompts(a):
    rng = np.random.default_rng(a.seed)
    lengths = rng.integers(a.prompt // 2, a.prompt + 1, a.batch)
    lengths[0] = a.prompt
    ids = np.zeros((a.batch, a.prompt), np.int32)
    mask = np.zeros((a.batch, a.prompt), np.int32)
    for b, n in enumerate(lengths):
        ids[b, a.prompt - n:] = rng.integers(3, a.vocab, n)
        mask[b, a.prompt - n:] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "num_new"))
def naive_generate(graphdef, state, prompt_ids_BxP, prompt_mask_BxP, num_new: int):
    """Greedy decoding that recomputes the whole (padded) sequence at every step: no cache."""
    B, Pl = prompt_ids_BxP.shape
    ids = jnp.concatenate([prompt_ids_BxP, jnp.zeros((B, num_new), jnp.int32)], 1)
    mask = jnp.concatenate([prompt_mask_BxP, jnp.zeros((B, num_new), jnp.int32)], 1)

    def body(n, carry):
        ids, mask = carry
        m = nnx.merge(graphdef, state)
        h = m(ids, attention_mask=mask, return_hidden=True)  # positions = cumsum(mask) - 1
        h_BxD = jax.lax.dynamic_index_in_dim(h, Pl + n - 1, axis=1, keepdims=False)
        logits = jnp.einsum("bd,dv->bv", h_BxD, m.lm_head_DxV(), preferred_element_type=jnp.float32)
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        ids = jax.lax.dynamic_update_slice(ids, nxt[:, None], (0, Pl + n))
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones((B, 1), jnp.int32), (0, Pl + n))
        return ids, mask

    ids, _ = jax.lax.fori_loop(0, num_new, body, (ids, mask))
    return ids[:, Pl:]


def run_interleaved(methods: dict, repeats: int) -> dict:
    """Warm-up call per method (timed: includes compilation), then `repeats` rounds that time each method once
    in turn, so that load from other processes hits all methods alike. Returns name -> (output, first, times)."""
    res = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        out = fn()
        res[name] = (out, time.perf_counter() - t0, [])
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            res[name][2].append(time.perf_counter() - t0)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--mlp", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", default="", help="comma-separated batch sizes: one table row per size")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf_threads", choices=["both", "default", "1"], default="both",
                   help="torch thread counts for transformers (default count, 1, or both)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="--batches: where transformers runs (jax uses its default backend)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="--batches: parameter/activation dtype of both sides")
    p.add_argument("--xla_single_thread", action="store_true",
                   help="XLA CPU without its intra-op thread pool (--xla_cpu_multi_thread_eigen=false)")
    a = p.parse_args()
    if a.batches:
        return batch_table(a)
    never = a.vocab + 1  # a stop id that is never sampled: every row runs all steps
    ids, mask = prompts(a)
    new_tokens = a.batch * a.new
    print(host_line(with_jax=True))
    print(f"device: {jax.devices()[0].device_kind}; model: {json.dumps(hf_config(a))}")
    print(f"batch {a.batch}, prompt {a.prompt} (left-padded), {a.new} new tokens, greedy, fp32; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as d:
        hf_model = build_checkpoint(a, d)
        model = load_pretrained(d)
    graphdef, state = nnx.split(model)
    def kv_cache(transposed=None):
        def run():
            generate_module.TRANSPOSED_DECODE = transposed
            try:
                return np.asarray(generate(model, ids, mask, max_new_tokens=a.new, greedy=True,
                                           eos_ids=(never,)).completion_ids)
            finally:
                generate_module.TRANSPOSED_DECODE = None
        return run

    methods = {
        "kv-cache (align_jax.sampling)": kv_cache(),
        "naive full recompute (jitted)": lambda: np.asarray(naive_generate(graphdef, state, ids, mask, a.new)),
        "kv-cache, model layout (before)": kv_cache(False),
    }
    if hf_model is not None:
        import torch

        def hf(threads, **sampling):
            def run():
                torch.set_num_threads(threads)
                torch.manual_seed(a.seed)
                with torch.no_grad():
                    out = hf_model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long),
                                            attention_mask=torch.as_tensor(mask, dtype=torch.long),
                                            do_sample=bool(sampling), **(sampling or dict(top_k=None, top_p=None)),
                                            max_new_tokens=a.new, min_new_tokens=a.new, eos_token_id=never,
                                            pad_token_id=0)
                return out[:, a.prompt:].numpy()
            return run

        thread_counts = {"default": [torch.get_num_threads()], "1": [1]}.get(
            a.hf_threads, sorted({torch.get_num_threads(), 1}, reverse=True))
        for threads in thread_counts:
            methods[f"transformers generate (torch {torch.__version__}, {threads} thr)"] = hf(threads)
    methods[SAMPLING_ROW] = lambda: np.asarray(
        generate(model, ids, mask, max_new_tokens=a.new, rng=a.seed, temperature=1.0, top_k=50, top_p=0.95,
                 eos_ids=(never,)).completion_ids)
    if hf_model is not None:
        methods[f"transformers generate, sampling ({thread_counts[0]} thr)"] = hf(
            thread_counts[0], temperature=1.0, top_k=50, top_p=0.95)
    res = run_interleaved(methods, a.repeats)
    names = list(methods)
    kv_ids = res[names[0]][0]
    best = {n: min(r[2]) for n, r in res.items()}
    print(f"\n{'method':<52} {'first call s':>12} {'best s':>8} {'median s':>9} {'new tok/s':>10} "
          f"{'kv-cache speed-up':>18}")
    for n in names:
        _, first, times = res[n]
        print(f"{n:<52} {first:>12.3f} {best[n]:>8.4f} {statistics.median(times):>9.4f} "
              f"{new_tokens / best[n]:>10.0f} {best[n] / best[names[0]]:>17.2f}x")
    hf_names = [n for n in names if n.startswith("transformers generate (")]
    hf_sampling = [n for n in names if n.startswith("transformers generate, sampling")]
    line = (f"speed-up of kv-cache (best times): {best[names[1]] / best[names[0]]:.1f}x vs naive recompute, "
            f"{best[names[2]] / best[names[0]]:.2f}x vs the model-layout decode")
    if hf_names:
        med = {n: statistics.median(res[n][2]) for n in names}
        line += (f", {min(best[n] for n in hf_names) / best[names[0]]:.1f}x vs transformers generate "
                 f"(its faster thread setting; {min(med[n] for n in hf_names) / med[names[0]]:.1f}x on medians)")
    if hf_sampling:
        line += (f"; sampling (T=1, top-k 50, top-p 0.95): {best[hf_sampling[0]] / best[SAMPLING_ROW]:.1f}x vs "
                 "transformers sampling")
    print(line)
    agree = ({"naive": res[names[1]][0], "model layout": res[names[2]][0]}
             | ({"transformers": res[hf_names[0]][0]} if hf_names else {}))
    print("greedy token agreement with kv-cache: "
          + ", ".join(f"{k} {float((v == kv_ids).mean()):.4f}" for k, v in agree.items()))


def batch_table(a):
    """One row per batch size: align-jax vs transformers, greedy and sampled (T=1, top-k 50, top-p 0.95)."""
    try:
        import torch
    except ImportError:
        sys.exit("--batches compares with transformers generate: it needs torch (pip install torch); without it, "
                 "run the default mode (--batch N), which skips the transformers rows")

    never = a.vocab + 1
    print(host_line(with_jax=True))
    print(f"device: {jax.devices()[0].device_kind}; model: {json.dumps(hf_config(a))}")
    print(f"prompt {a.prompt} (left-padded), {a.new} new tokens, {a.dtype}, torch {torch.__version__} on "
          f"{a.device} ({torch.get_num_threads()} threads); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        hf_model = build_checkpoint(a, d)
        model = load_pretrained(d, dtype=a.dtype)
    print(f"checkpoint built, saved and loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    hf_model = hf_model.to(device=a.device, dtype=getattr(torch, a.dtype))
    sampling = dict(temperature=1.0, top_k=50, top_p=0.95)
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        a.batch = batch
        ids, mask = prompts(a)

        def ours(greedy, ids=ids, mask=mask):
            kw = dict(greedy=True) if greedy else dict(rng=a.seed, **sampling)
            return lambda: np.asarray(generate(model, ids, mask, max_new_tokens=a.new, eos_ids=(never,),
                                               **kw).completion_ids)

        def hf(greedy, ids=ids, mask=mask):
            def run():
                torch.manual_seed(a.seed)
                with torch.no_grad():
                    out = hf_model.generate(input_ids=torch.as_tensor(ids, dtype=torch.long, device=a.device),
                                            attention_mask=torch.as_tensor(mask, dtype=torch.long, device=a.device),
                                            do_sample=not greedy,
                                            **(dict(top_k=None, top_p=None) if greedy else sampling),
                                            max_new_tokens=a.new, min_new_tokens=a.new, eos_token_id=never,
                                            pad_token_id=0)
                return out[:, a.prompt:].cpu().numpy()
            return run

        res = run_interleaved({"jax greedy": ours(True), "hf greedy": hf(True), "jax sampled": ours(False),
                               "hf sampled": hf(False)}, a.repeats)
        best = {n: min(r[2]) for n, r in res.items()}
        agree = float((res["jax greedy"][0] == res["hf greedy"][0]).mean())
        rows.append((batch, {n: batch * a.new / t for n, t in best.items()}, agree))
        r = rows[-1][1]
        print(f"batch {batch}: greedy {r['jax greedy']:.0f} vs {r['hf greedy']:.0f} tok/s "
              f"({r['jax greedy'] / r['hf greedy']:.2f}x), sampled {r['jax sampled']:.0f} vs {r['hf sampled']:.0f} "
              f"({r['jax sampled'] / r['hf sampled']:.2f}x); first calls (compile) jax "
              f"{res['jax greedy'][1]:.1f} s / {res['jax sampled'][1]:.1f} s; greedy agreement with transformers "
              f"{agree:.4f}", flush=True)
    # The roofline: a new token costs at least the products with every weight matrix (2 FLOPs per weight, the
    # embedding lookup aside; attention over the cache adds to it), so tokens/s x that is a FLOP rate that cannot
    # pass this machine's matmul rate.
    flops = 2 * (sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) - a.vocab * a.hidden)
    peak = matmul_peak() if a.device == "cpu" else float("nan")  # (on a GPU: the decode is bandwidth-bound)
    print(f"\nmatmul peak (XLA, fp32 1024^3, best of 8): {peak / 1e9:.0f} GFLOP/s; a new token >= {flops / 1e6:.1f} MFLOP")
    print("\n| batch | align-jax greedy tok/s | transformers greedy tok/s | ratio | align-jax sampled tok/s | "
          "transformers sampled tok/s | ratio | align-jax greedy % of matmul peak | 3x transformers needs | "
          "issue 16's >= 3x (greedy, sampled) |\n|---|---|---|---|---|---|---|---|---|---|")
    for batch, r, _ in rows:
        g, smp = r['jax greedy'] / r['hf greedy'], r['jax sampled'] / r['hf sampled']
        verdict = "met" if min(g, smp) >= 3 else "NOT met"
        print(f"| {batch} | {r['jax greedy']:.0f} | {r['hf greedy']:.0f} | {g:.2f}x | "
              f"{r['jax sampled']:.0f} | {r['hf sampled']:.0f} | {smp:.2f}x | "
              f"{r['jax greedy'] * flops / peak:.0%} | {3 * r['hf greedy'] * flops / peak:.0%} | {verdict} |")


if __name__ == "__main__":
    main()
