"""The train step's finiteness check (`align_jax.train.step.all_finite`) against the `isfinite(x).all()` it
replaced, on a 110M Llama's parameter shapes x 3 (params + AdamW mu and nu, 329 M fp32 values), jitted, best of
`--repeats`, both in one process:

    python benchmarks/finite_check.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from align_jax.hostinfo import host_line  # noqa: E402
from align_jax.train.step import all_finite  # noqa: E402

# llama-110m (benchmarks/aot_topology.py): tied embedding [32000, 768], 12 layers of 4 [768, 768] attention and
# 3 [768, 2048] MLP matrices and 2 norms, the final norm.
SHAPES = [(32000, 768)] + [(768, 768)] * 48 + [(768, 2048)] * 36 + [(768,)] * 25


def isfinite_all(tree):
    """The previous check: a boolean copy of every leaf, then a reduction over it."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def best(f, tree, repeats):
    f(tree).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(tree).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    leaves = [jnp.ones(s, jnp.float32) for s in SHAPES]
    tree = [leaves, [x * 2 for x in leaves], [x * 3 for x in leaves]]
    n = sum(x.size for x in jax.tree.leaves(tree))
    new, old = jax.jit(all_finite), jax.jit(isfinite_all)
    bad = [[x.at[(0,) * x.ndim].set(jnp.nan) if i == 3 else x for i, x in enumerate(leaves)]] + tree[1:]
    assert bool(new(tree)) and bool(old(tree)) and not bool(new(bad)) and not bool(old(bad))  # same decisions
    print(host_line(with_jax=True))
    t_old, t_new = best(old, tree, a.repeats), best(new, tree, a.repeats)
    print(f"{n / 1e6:.0f} M fp32 values: isfinite(x).all() {t_old * 1e3:.1f} ms, all_finite (sum of x * 0) "
          f"{t_new * 1e3:.1f} ms: {t_old / t_new:.2f}x")


if __name__ == "__main__":
    main()
