"""Why the sampler's CPU decode step puts the weight first: the decode step's matrix products, timed alone.

A decode step multiplies R rows of activations by every weight once. This script runs the 17 products of the
`sampler_speed.py` model (per layer: qkv [512, 256], o [256, 256], gate_up [1376, 256], down [256, 688];
the head [2048, 256]; 13.6 MB of fp32 weights in [out, in] layout) as one chain inside a jitted
`lax.fori_loop`, and reports the time per step for each R:

- `x W^T`:          einsum("rd,fd->rf", x, W): the activations are the dot's left operand;
- `W x^T` (decode): einsum("fd,rd->fr", W, x) behind an optimization barrier, then transposed: the weight is
                    the left operand, as `align_jax.sampling.decode._mm` computes it.

XLA:CPU's matmul library repacks a dot's right operand on every call; at small R that repacking of the weights
costs more than the product. Best of `--repeats` interleaved runs (the machine may be shared).

    python benchmarks/decode_matmul.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from align_jax.hostinfo import host_line  # noqa: E402

SHAPES = [(512, 256), (256, 256), (1376, 256), (256, 688)] * 4 + [(2048, 256)]  # [out, in]
D = 256


def _fit(y_RxF, n):
    """The first n columns (zero-padded): feeds one product's output to the next one's input width."""
    F = y_RxF.shape[1]
    return y_RxF[:, :n] if F >= n else jnp.pad(y_RxF, ((0, 0), (0, n - F)))


def x_first(x_RxD, w_FxD):
    return jnp.einsum("rd,fd->rf", x_RxD, w_FxD)


def weight_first(x_RxD, w_FxD):
    return lax.optimization_barrier(jnp.einsum("fd,rd->fr", w_FxD, x_RxD)).T


def chain(mm, steps):
    @jax.jit
    def run(x_RxD, ws):
        def body(_, x):
            h = x
            for w in ws:
                h = _fit(jnp.tanh(mm(_fit(h, w.shape[1]), w)), D)
            return x + 1e-3 * h
        return lax.fori_loop(0, steps, body, x_RxD)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.01, jnp.float32) for s in SHAPES]
    mb = sum(np.prod(s) for s in SHAPES) * 4 / 1e6
    print(host_line(with_jax=True))
    print(f"device: {jax.devices()[0].device_kind}; {len(SHAPES)} products, {mb:.1f} MB of fp32 weights")
    print(f"{'rows':>5} {'x W^T ms/step':>14} {'W x^T ms/step':>14} {'speed-up':>9}   (best; median)")
    for R in a.rows:
        x = jnp.asarray(rng.standard_normal((R, D)), jnp.float32)
        fns = {"x": chain(x_first, a.steps), "w": chain(weight_first, a.steps)}
        np.testing.assert_allclose(np.asarray(fns["x"](x, ws)), np.asarray(fns["w"](x, ws)), rtol=1e-4, atol=1e-5)
        times = {k: [] for k in fns}
        for _ in range(a.repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, ws))
                times[k].append((time.perf_counter() - t0) / a.steps * 1e3)
        bx, bw = min(times["x"]), min(times["w"])
        print(f"{R:>5} {bx:>14.3f} {bw:>14.3f} {bx / bw:>8.2f}x   "
              f"({statistics.median(times['x']):.3f}; {statistics.median(times['w']):.3f})")


if __name__ == "__main__":
    main()
