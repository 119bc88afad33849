"""Reference log-probs computed once per (data, tokenizer, reference model, lengths) and kept on disk next to the
TFDS data (`<data_dir>/reference_logps/<key>.npz`), so a restarted run and later runs on the same data reuse them
instead of running the reference over the whole training set again.

The key is a SHA-256 over everything the numbers depend on: the built dataset's content fingerprint, the
tokenizer (vocabulary, special tokens, chat template), the reference model (its config and a checksum of every base
weight, computed on device: per tensor the sum and the sum of squares of a fixed pseudo-random projection in
fp32), the loader's length settings, the vocabulary chunk and batch size of the pass, the mesh shape and the
platform (different shapes can change the last bits; a cache hit must be bit-identical to recomputing). A file
that cannot be read is recomputed and rewritten; writes are atomic (temporary file + rename) and done by process 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

DIRNAME = "reference_logps"


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps({"vocab": vocab, "special": tokenizer.special_tokens_map, "template": tokenizer.chat_template,
                       "class": type(tokenizer).__name__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@jax.jit
def _checksums(leaves):
    out = []
    for x in leaves:
        x = x.astype(jnp.float32).reshape(-1)
        w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32) * 0.7071)  # a fixed projection: catches permutations
        out.append(jnp.stack([jnp.sum(x * w), jnp.sum(x * x)]))
    return jnp.stack(out)


def model_fingerprint(model) -> str:
    """A hash of the model's config and of its base weights (LoRA adapters excluded: the reference runs with
    them off)."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    flat = nnx.to_flat_state(state)
    names = [str(p) for p, _ in flat]
    sums = np.asarray(jax.device_get(_checksums([v.get_value() for _, v in flat])), np.float32)
    cfg = getattr(model, "config", None)
    blob = json.dumps({"names": names, "shapes": [list(v.get_value().shape) for _, v in flat],
                       "dtypes": [str(v.get_value().dtype) for _, v in flat], "config": repr(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode() + sums.tobytes()).hexdigest()


def cache_key(*, data_fingerprint: str, tokenizer, model, loader_kw: dict, extra: dict, mesh) -> tuple[str, dict]:
    """(hex key, the JSON-able description it hashes)."""
    desc = {"data": data_fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer), "model": model_fingerprint(model),
            "loader": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(loader_kw.items())},
            "mesh": dict(mesh.shape), "platform": jax.devices()[0].platform, **extra}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32], desc


def load(data_dir: str, key: str, shape: tuple) -> np.ndarray | None:
    path = os.path.join(data_dir, DIRNAME, key + ".npz")
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            table = f["table"]
    except Exception as e:  # damaged: recompute (and rewrite)
        log.warning("reference log-probs cache %s cannot be read (%s): recomputing", path, e)
        return None
    if table.shape != shape or np.isnan(table).any():
        log.warning("reference log-probs cache %s has shape %s (expected %s) or missing values: recomputing", path,
                    table.shape, shape)
        return None
    return table


def save(data_dir: str, key: str, table: np.ndarray, desc: dict) -> str:
    path = os.path.join(data_dir, DIRNAME, key + ".npz")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, table=table, desc=np.asarray(json.dumps(desc, sort_keys=True, default=str)))
        os.replace(tmp, path)
    return path
