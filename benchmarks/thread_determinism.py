"""Does XLA:CPU's result depend on how many CPUs the process may use? (It does; the README's reproducibility note.)

    python benchmarks/thread_determinism.py

Runs the same jitted `value_and_grad` of the toy model's next-token loss (batch 32 x 64 tokens, random init,
seed 0) in fresh processes restricted to different CPU sets (`align_jax.cli.pin_threads` semantics, i.e.
sched_setaffinity before jax starts), and prints a hash of the loss and every gradient bit, and the largest
gradient difference from the first run. Same hash = bitwise the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from align_jax.hostinfo import host_line  # noqa: E402

CHILD = r"""
import hashlib, json, os, sys
os.sched_setaffinity(0, set(json.loads(sys.argv[1])))
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from align_jax.data.toy import toy_model_config
from align_jax.models import from_hf_config
from align_jax.models.llama import Transformer
m = Transformer(from_hf_config(toy_model_config()), rngs=nnx.Rngs(0))
g, p, r = nnx.split(m, nnx.Param, ...)
ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (32, 64)), jnp.int32)
def loss(p):
    lg = nnx.merge(g, p, r)(ids, jnp.ones_like(ids))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg[:, :-1]), ids[:, 1:, None], -1))
l, gr = jax.jit(jax.value_and_grad(loss))(p)
leaves = [np.asarray(x) for x in jax.tree.leaves(gr)]
h = hashlib.sha256(np.asarray(l).tobytes())
for x in leaves:
    h.update(x.tobytes())
np.savez(sys.argv[2], *leaves)
print(json.dumps({"hash": h.hexdigest()[:16], "loss": float(l)}))
"""


def run(cpus: list[int], out: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cpus), out], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    import numpy as np

    cpus = sorted(os.sched_getaffinity(0))
    sets = [[cpus[0]]] + ([[cpus[1]], cpus[:2]] if len(cpus) > 1 else [])
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "align_jax_thread_determinism")
    os.makedirs(tmp, exist_ok=True)
    first = None
    print(host_line())
    print(f"{'CPUs':<10} {'hash of loss + gradients':<26} {'loss':<22} max |grad - first run's|")
    for i, s in enumerate(sets):
        path = os.path.join(tmp, f"g{i}.npz")
        res = run(s, path)
        grads = list(np.load(path).values())
        first = first or grads
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(grads, first))
        print(f"{','.join(map(str, s)):<10} {res['hash']:<26} {res['loss']!r:<22} {diff:.3g}")
    if len(cpus) < 2:
        print("(one CPU available: nothing to compare)")


if __name__ == "__main__":
    main()
