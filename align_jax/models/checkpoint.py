"""Hugging Face checkpoint directories (config.json + safetensors) in and out, without PyTorch.

`load_pretrained` maps each safetensors tensor to its parameter (transposing torch's [out, in] Linear layout
into our [in, ..., out] layout) and places it straight into its sharding with
`jax.make_array_from_callback`: every device receives only its own slice, read from the memory-mapped file,
so no device ever holds an unsharded copy. `save_pretrained` writes the inverse mapping, so that
transformers and vLLM load the result and load -> save -> load is bit-exact.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from align_jax.errors import UserError
from align_jax.models.config import ModelConfig, load_hf_config, rope_inv_freq, to_hf_config
from align_jax.models.llama import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that does not match its config; the message names the file and tensor."""


def _t(x):
    return np.ascontiguousarray(x.T)


def hf_key_map(c: ModelConfig) -> dict[tuple, tuple[str, Callable, Callable]]:
    """Our parameter path -> (HF tensor name, HF->ours, ours->HF)."""
    D, H, K, E, F = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    ident = lambda x: x  # noqa: E731
    m = {("embed",): ("model.embed_tokens.weight", ident, ident),
         ("final_norm", "weight"): ("model.norm.weight", ident, ident)}
    if not c.tie_word_embeddings:
        m[("lm_head",)] = ("lm_head.weight", _t, _t)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        a, L = ("layers", i, "attn"), ("layers", i)
        m[a + ("q",)] = (p + "self_attn.q_proj.weight", lambda x: _t(x).reshape(D, H, E),
                         lambda x: _t(x.reshape(D, H * E)))
        for n, heads in (("k", K), ("v", K)):
            m[a + (n,)] = (p + f"self_attn.{n}_proj.weight", lambda x, h=heads: _t(x).reshape(D, h, E),
                           lambda x, h=heads: _t(x.reshape(D, h * E)))
        m[a + ("o",)] = (p + "self_attn.o_proj.weight", lambda x: _t(x).reshape(H, E, D),
                         lambda x: _t(x.reshape(H * E, D)))
        if c.attention_bias:
            for n, heads in (("q", H), ("k", K), ("v", K)):
                m[a + (f"{n}_bias",)] = (p + f"self_attn.{n}_proj.bias", lambda x, h=heads: x.reshape(h, E),
                                         lambda x: x.reshape(-1))
        if c.o_bias:
            m[a + ("o_bias",)] = (p + "self_attn.o_proj.bias", ident, ident)
        if c.qk_norm:
            m[a + ("q_norm", "weight")] = (p + "self_attn.q_norm.weight", ident, ident)
            m[a + ("k_norm", "weight")] = (p + "self_attn.k_norm.weight", ident, ident)
        for n in ("gate", "up", "down"):
            m[L + ("mlp", n)] = (p + f"mlp.{n}_proj.weight", _t, _t)
            if c.mlp_bias:
                m[L + ("mlp", f"{n}_bias")] = (p + f"mlp.{n}_proj.bias", ident, ident)
        m[L + ("input_norm", "weight")] = (p + "input_layernorm.weight", ident, ident)
        m[L + ("post_attn_norm", "weight")] = (p + "post_attention_layernorm.weight", ident, ident)
    return m


def _tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file that holds it."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found "
                              "(PyTorch .bin checkpoints are not read; convert them to safetensors)")
    with safe_open(single, framework="numpy") as f:
        return {k: single for k in f.keys()}


def _to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    return x if x.dtype == np.dtype(dtype) else x.astype(np.dtype(dtype))


def load_pretrained(path: str, *, dtype=jnp.float32, compute_dtype=None, remat_policy: str = "none",
                    mesh=None) -> Transformer:
    """Loads a Hugging Face model directory into a `Transformer`.

    Args:
      path: directory with config.json and model.safetensors (or sharded *.safetensors + index).
      dtype: parameter dtype (weights are cast on the host as they are read).
      compute_dtype: activation dtype (default: `dtype`).
      remat_policy: 'none', 'full', 'dots', 'dots_with_no_batch_dims'.
      mesh: a `jax.sharding.Mesh`; each weight goes straight to its sharding under `align_jax.parallel.RULES`.
    """
    from align_jax.parallel import param_shardings

    config = load_hf_config(path, param_dtype=dtype, compute_dtype=compute_dtype, remat_policy=remat_policy)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh) if mesh is not None else None
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    files = _tensor_files(path)
    key_map = hf_key_map(config)
    expected = {v[0] for v in key_map.values()}
    ignored = {k for k in files if k not in expected and not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        ignored.discard("lm_head.weight")  # some exporters write the tied copy too
    if ignored:
        raise CheckpointError(f"{path}: tensors that this architecture does not use: {sorted(ignored)[:5]}"
                              f"{' ...' if len(ignored) > 5 else ''}")
    handles: dict[str, object] = {}
    out = []
    try:
        for pth, var in nnx.to_flat_state(abs_state):
            sharding = flat_shardings.get(pth)
            sharding = getattr(sharding, "value", sharding)
            if pth == ("inv_freq",):
                host = rope_inv_freq(config)
            else:
                name, to_jax, _ = key_map[pth]
                if name not in files:
                    raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
                fname = files[name]
                if fname not in handles:
                    handles[fname] = safe_open(fname, framework="numpy")
                host = _to_dtype(to_jax(handles[fname].get_tensor(name)), var.get_value().dtype)
                if host.shape != var.get_value().shape:
                    raise CheckpointError(f"{fname}: tensor {name!r} has shape {handles[fname].get_slice(name).get_shape()}"
                                          f" but config.json implies {var.get_value().shape} (after layout change)")
            if sharding is not None:
                arr = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
            else:
                arr = jnp.asarray(host)
            out.append((pth, var.replace(arr)))
    finally:
        handles.clear()
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def _host(x) -> np.ndarray:
    """Gathers a (possibly sharded, possibly multi-host) array to host numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(model: Transformer, path: str, *, max_shard_bytes: int = 5 * 2**30,
                    extra_config: dict | None = None) -> None:
    """Writes `model` as a Hugging Face directory: config.json plus model.safetensors (or several shards of at
    most `max_shard_bytes` with model.safetensors.index.json). Only process 0 writes."""
    config = model.config
    key_map = hf_key_map(config)
    tensors = {}
    for pth, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, _, to_hf = key_map[pth]
        tensors[name] = np.ascontiguousarray(to_hf(_host(var.get_value())))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    cfg = to_hf_config(config)
    if extra_config:
        cfg.update(extra_config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    shards, cur, size = [], {}, 0
    for name in sorted(tensors, key=_natural_key):
        nbytes = tensors[name].nbytes
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = tensors[name], size + nbytes
    shards.append(cur)
    for stale in [f for f in os.listdir(path) if f.endswith(".safetensors") or f == INDEX_NAME]:
        os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]
