"""The machine's matrix-multiplication rate: the ceiling the benchmarks' FLOP rates are compared with."""

from __future__ import annotations

import time


def matmul_peak(framework: str = "xla", n: int = 1024, reps: int = 8) -> float:
    """fp32 [n, n] x [n, n] products per second, in FLOP/s, best of `reps` (after one warm-up), under XLA (jax,
    jitted) or torch (its default thread count): the ceiling of any implementation of the same work on this
    machine with that library."""
    if framework == "xla":
        import jax
        import jax.numpy as jnp

        x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        run = lambda: f(x).block_until_ready()  # noqa: E731
    elif framework == "torch":
        import torch

        y = torch.randn(n, n)
        run = lambda: y @ y  # noqa: E731
    else:
        raise ValueError(f"framework={framework!r}: xla | torch")
    run()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
