"""What the comparison benchmarks share: the machine's matrix-multiplication rate (the ceiling their FLOP rates are
compared with), running one side of a comparison in a fresh process, and timing align-jax's online training loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def run_child(cmd: list[str], what: str) -> dict:
    """Runs `cmd` (a benchmark's own `--child` invocation: one side in a fresh process), returns the JSON dict it
    printed on its last `RESULT ` line with the load average before it started (`loadavg_before`); on failure,
    prints the child's output tail and raises."""
    load = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"the {what} run failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len("RESULT "):])
    res["loadavg_before"] = load
    return res


def train_timed_steps(config, workdir: str, warmup: int, steps: int) -> tuple[list[dict], float]:
    """Runs `train(config, workdir)` (an online run of `warmup` + `steps` optimizer steps); returns the metrics.jsonl
    rows of the `steps` timed steps (those after `warmup`, which compile) and the whole run's wall seconds."""
    from align_jax.train import train

    t0 = time.perf_counter()
    train(config, workdir)
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "step_seconds" in r and r["step"] > warmup]
    assert len(rows) == steps, rows
    return rows, total


def comma_choices(*allowed):
    """An argparse type: a comma-separated list, each item one of `allowed` (e.g. `--sides jax,trl`)."""
    import argparse

    def parse(text):
        names = [x.strip() for x in text.split(",") if x.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"{text!r}: comma-separated, each one of {', '.join(allowed)}")
        return names
    return parse


def at_least(low: int):
    """An argparse type: an integer >= `low`."""
    import argparse

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: an integer >= {low}")
        return value
    return parse
