"""Peak memory of naive vs vocabulary-chunked token log-probs, forward + backward.

Measures `jax.jit(value_and_grad(loss, argnums=(hidden, lm_head))).lower(*ShapeDtypeStructs).compile()
.memory_analysis()` -- ahead-of-time, nothing is allocated -- with loss = sum_{b,t} logp[b, t], for the
naive log-softmax, `token_logps` (custom VJP) and `token_logps_remat` (scan + jax.checkpoint autodiff).
Peak = temp + argument + output bytes (alias bytes are printed too). Default shape: Llama 3 vocabulary,
B=8, T=1024, V=128256, D=2048.

    python benchmarks/logprob_memory.py                  # full size, fp32 and bf16
    python benchmarks/logprob_memory.py --small --time   # quick run, with timings
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without install

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from align_jax.ops.logprobs import naive_token_logps, token_logps, token_logps_remat  # noqa: E402

GIB = 2.0**30


def _loss_fn(impl, chunk_size, entropy):
    def loss(hidden_BxTxD, lm_head_DxV, targets_BxT):
        if impl == "naive":
            out = naive_token_logps(hidden_BxTxD, lm_head_DxV, targets_BxT, return_entropy=entropy)
        else:
            f = token_logps if impl == "chunked" else token_logps_remat
            out = f(hidden_BxTxD, lm_head_DxV, targets_BxT, chunk_size=chunk_size, return_entropy=entropy)
        if entropy:
            return jnp.sum(out[0]) + 0.01 * jnp.sum(out[1])
        return jnp.sum(out)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _specs(b, t, d, v, dtype):
    return (
        jax.ShapeDtypeStruct((b, t, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    )


def measure(impl, b, t, d, v, dtype, chunk_size, entropy=False):
    compiled = _loss_fn(impl, chunk_size, entropy).lower(*_specs(b, t, d, v, dtype)).compile()
    ma = compiled.memory_analysis()
    parts = {
        "arg": ma.argument_size_in_bytes,
        "out": ma.output_size_in_bytes,
        "temp": ma.temp_size_in_bytes,
        "alias": ma.alias_size_in_bytes,
    }
    parts["peak"] = parts["arg"] + parts["out"] + parts["temp"]
    return parts, compiled


def _time(compiled, b, t, d, v, dtype, reps=3):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    args = (
        jax.random.normal(k1, (b, t, d), dtype),
        (jax.random.normal(k2, (d, v), jnp.float32) / d**0.5).astype(dtype),
        jax.random.randint(k3, (b, t), 0, v),
    )
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - start) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--entropy", action="store_true", help="also differentiate the entropy output")
    p.add_argument("--small", action="store_true", help="B=2, T=128, V=32000, D=256, chunk=4096")
    p.add_argument("--time", action="store_true", help="also run and time each variant (real allocation!)")
    a = p.parse_args()
    if a.small:
        a.batch, a.seq, a.vocab, a.hidden, a.chunk = 2, 128, 32000, 256, 4096
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; B={a.batch} T={a.seq} V={a.vocab} "
          f"D={a.hidden} chunk={a.chunk} entropy={a.entropy}; value_and_grad wrt (hidden, lm_head)")
    hdr = f"{'dtype':9s} {'impl':8s} {'arg GiB':>8s} {'out GiB':>8s} {'temp GiB':>9s} {'alias':>6s} {'peak GiB':>9s}"
    print(hdr + ("  time s" if a.time else ""))
    for dname in a.dtypes.split(","):
        dtype = jnp.dtype(dname)
        peaks = {}
        for impl in ("naive", "chunked", "remat"):
            parts, compiled = measure(impl, a.batch, a.seq, a.hidden, a.vocab, dtype, a.chunk, a.entropy)
            peaks[impl] = parts["peak"]
            line = (f"{dname:9s} {impl:8s} {parts['arg'] / GIB:8.3f} {parts['out'] / GIB:8.3f} "
                    f"{parts['temp'] / GIB:9.3f} {parts['alias'] / GIB:6.3f} {parts['peak'] / GIB:9.3f}")
            if a.time:
                line += f"  {_time(compiled, a.batch, a.seq, a.hidden, a.vocab, dtype):6.3f}"
            print(line)
        print(f"{dname:9s} ratio naive/chunked = {peaks['naive'] / peaks['chunked']:.2f}x, "
              f"naive/remat = {peaks['naive'] / peaks['remat']:.2f}x")


if __name__ == "__main__":
    main()
