"""A decoder-only transformer in Flax NNX covering the Llama family exactly as transformers implements it.

Shapes: B batch, T tokens, D hidden, H query heads, K key/value heads, G = H/K, E head dim, F MLP features,
V vocabulary. Parameters are stored in "inputs x outputs" layout with explicit head axes (q: [D, H, E]) and
carry logical axis names (`logical_axes` metadata) that `align_jax.parallel.RULES` maps to the mesh.

Numerics follow transformers' eager implementation (`modeling_llama.py`, `modeling_qwen2.py`,
`modeling_qwen3.py`): RMSNorm in fp32 then cast back; RoPE with `rotate_half`, cos/sin computed in fp32 from
`inv_freq @ positions`; attention softmax in fp32; SwiGLU MLP `down(silu(gate(x)) * up(x))`.

Incremental decoding: `model(ids, mask, positions, cache=kv)` with a preallocated `KVCache` (see
`init_cache`) writes the new tokens' keys/values into slots [end, end + T) and attends over all S slots,
masked to the valid ones (left-pad and unwritten slots are invalid) and causally by slot index.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.models.config import ModelConfig, rope_inv_freq
from align_jax.parallel.batch import constrain_batch

NEG_INF = float(jnp.finfo(jnp.float32).min)


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, std: float | None = 0.02, value: float = 0.0):
    if std is None:
        init = jnp.full(shape, value, dtype)
    else:
        init = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(init, logical_axes=axes)


class RMSNorm(nnx.Module):
    """y = w · (x / sqrt(mean(x²) + eps)), the statistics in fp32 (transformers' `LlamaRMSNorm`)."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), ("norm",), dtype, std=None, value=1.0)
        self.eps = eps

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)


def rope_cos_sin(inv_freq_half, positions_BxT, dtype):
    """cos, sin [B, T, E] of transformers' `LlamaRotaryEmbedding` (attention_scaling is 1 for the supported
    types): freqs = positions ⊗ inv_freq, emb = [freqs, freqs]."""
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_half[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_BxTxHxE, cos_BxTxE, sin_BxTxE):
    """x·cos + rotate_half(x)·sin with rotate_half(x) = [-x₂, x₁] (transformers' `apply_rotary_pos_emb`)."""
    half = x_BxTxHxE.shape[-1] // 2
    x1, x2 = x_BxTxHxE[..., :half], x_BxTxHxE[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxTxHxE * cos_BxTxE[:, :, None, :] + rotated * sin_BxTxE[:, :, None, :]


def attention_mask_BxTxS(attention_mask_BxT=None, segment_ids_BxT=None, T: int | None = None):
    """Boolean [B, T, S] mask: causal, keys that are real tokens, and (when packed) the same segment."""
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    mask = causal
    if attention_mask_BxT is not None:
        mask = mask & attention_mask_BxT.astype(bool)[:, None, :]
    if segment_ids_BxT is not None:
        seg = segment_ids_BxT
        mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, None, :]
    return mask


def default_positions(attention_mask_BxT=None, segment_ids_BxT=None, B: int = 1, T: int = 1):
    """Positions when none are given: restart at 0 in each packed segment; otherwise count real tokens
    (cumsum(mask) - 1, clipped at 0), which is `arange` for right padding and what `generate` uses for
    left padding."""
    if segment_ids_BxT is not None:
        seg = segment_ids_BxT
        idx = jnp.broadcast_to(jnp.arange(T), seg.shape)
        starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
        return (idx - start_idx).astype(jnp.int32)
    if attention_mask_BxT is not None:
        return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


# LoRA (`align_jax.models.lora`): weight -> number of its leading input axes (q [D, H, E]: 1; o [H, E, D]: 2)
LORA_IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


# LoRA adapter dropout (PEFT's `lora_dropout`: y + (α/r)·(dropout(x)·A)·B) is on only inside `lora_dropout(key,
# rate)`, which the train step opens around the policy's loss; outside it (evaluation, sampling, reference and
# π_old log-probs) adapters see x itself. Each adapter's mask is drawn from the key folded with its layer's index
# (`_layer_index`, set by `Transformer` for unrolled and scanned layers) and its weight's name, so it is the same
# under remat's recomputation and for any trace order.
_DROPOUT = contextvars.ContextVar("lora_dropout", default=None)
_LAYER = contextvars.ContextVar("lora_layer", default=0)
_WEIGHT_IDS = {name: i for i, name in enumerate(LORA_IN_AXES)}


@contextlib.contextmanager
def lora_dropout(key, rate: float):
    """Adapter dropout with probability `rate` (inverted: kept inputs scaled by 1/(1 − rate)) inside the block;
    `rate` 0: nothing changes."""
    token = _DROPOUT.set((key, float(rate)) if rate else None)
    try:
        yield
    finally:
        _DROPOUT.reset(token)


@contextlib.contextmanager
def _layer_index(i):
    token = _LAYER.set(i)
    try:
        yield
    finally:
        _LAYER.reset(token)


def _dropped(x, name: str):
    drop = _DROPOUT.get()
    if drop is None:
        return x
    key, rate = drop
    key = jax.random.fold_in(jax.random.fold_in(key, _LAYER.get()), _WEIGHT_IDS[name])
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _adapted(module, name: str, x, y):
    """y + (α/r)·(x·A)·B when `module` has an active LoRA adapter on weight `name` (Hu et al. 2021, eq. 3; in x's
    dtype; x dropped out inside `lora_dropout`), else y unchanged (no adapter: nothing is traced)."""
    a = getattr(module, f"lora_{name}_a", None)
    if a is None or not getattr(module, "lora_on", False):
        return y
    x = _dropped(x, name)
    xa = jnp.tensordot(x, a[...].astype(x.dtype), axes=LORA_IN_AXES[name])
    b = getattr(module, f"lora_{name}_b")[...].astype(x.dtype)
    return y + jnp.tensordot(xa, b, axes=1) * jnp.asarray(module.lora_scale, x.dtype)


def fused_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxTxS, scale: float, implementation: str):
    """softmax(q kᵀ · scale + mask) v by `jax.nn.dot_product_attention` (grouped-query heads broadcast by the
    function): "dot_product" = XLA's implementation (logits and softmax in fp32, as the einsum path), "cudnn" =
    cuDNN's fused flash attention (GPU). The boolean mask (causal, padding, packed segments) is passed whole, and
    `is_causal` lets the kernel skip the blocks above the diagonal. A query whose keys are all masked (a padding
    token of a packed row) attends to itself instead of to nothing: only padding positions change, and the
    kernel never sees an all-masked row."""
    T, S = mask_BxTxS.shape[1:]
    mask_BxTxS = mask_BxTxS | jnp.eye(T, S, dtype=bool)[None]
    return jax.nn.dot_product_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask=mask_BxTxS[:, None], scale=scale,
                                        is_causal=True, implementation=None if implementation == "dot_product"
                                        else implementation)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        D, H, K, E, dt = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.param_dtype
        self.q = _param(rngs, (D, H, E), ("embed", "q_heads", "head_dim"), dt)
        self.k = _param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), dt)
        self.v = _param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), dt)
        self.o = _param(rngs, (H, E, D), ("q_heads", "head_dim", "embed"), dt)
        if c.attention_bias:
            self.q_bias = _param(rngs, (H, E), ("q_heads", "head_dim"), dt, std=None)
            self.k_bias = _param(rngs, (K, E), ("kv_heads", "head_dim"), dt, std=None)
            self.v_bias = _param(rngs, (K, E), ("kv_heads", "head_dim"), dt, std=None)
        if c.o_bias:
            self.o_bias = _param(rngs, (D,), ("norm",), dt, std=None)
        if c.qk_norm:
            self.q_norm = RMSNorm(E, c.rms_norm_eps, dt, rngs)
            self.k_norm = RMSNorm(E, c.rms_norm_eps, dt, rngs)
        self.c = c

    def __call__(self, x_BxTxD, cos, sin, mask_BxTxS, kv=None, index=None):
        """Returns y [B, T, D]; with `kv` = (k_cache, v_cache) [B, K, S, E] the new keys/values are first
        written at slots [index, index + T), attention runs over the S cached slots (`mask_BxTxS` [B, T, S])
        and (y, (k_cache, v_cache)) is returned."""
        c, dt = self.c, x_BxTxD.dtype
        B, T, _ = x_BxTxD.shape
        q = _adapted(self, "q", x_BxTxD, jnp.einsum("btd,dhe->bthe", x_BxTxD, self.q[...].astype(dt)))
        k = _adapted(self, "k", x_BxTxD, jnp.einsum("btd,dke->btke", x_BxTxD, self.k[...].astype(dt)))
        v = _adapted(self, "v", x_BxTxD, jnp.einsum("btd,dke->btke", x_BxTxD, self.v[...].astype(dt)))
        if c.attention_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv_spec = "bske"
        if kv is not None:  # cache layout [B, K, S, E]: what both attention dots consume, no per-step transpose
            kv_spec = "bkse"
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], jnp.swapaxes(k, 1, 2).astype(kv[0].dtype), index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], jnp.swapaxes(v, 1, 2).astype(kv[1].dtype), index, axis=2)
            kv = (k, v)
            k, v = k.astype(dt), v.astype(dt)
        if kv is None and c.attention != "xla":
            out = fused_attention(q, k, v, mask_BxTxS, c.head_dim ** -0.5, c.attention)
            return self._out(out)
        K, G = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        q = q.reshape(B, T, K, G, c.head_dim)
        scores = jnp.einsum(f"btkge,{kv_spec}->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (c.head_dim ** -0.5)
        scores = jnp.where(mask_BxTxS[:, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum(f"bkgts,{kv_spec}->btkge", probs, v).reshape(B, T, c.num_attention_heads, c.head_dim)
        y = self._out(out)
        return y if kv is None else (y, kv)

    def _out(self, out_BxTxHxE):
        y = _adapted(self, "o", out_BxTxHxE, jnp.einsum("bthe,hed->btd", out_BxTxHxE,
                                                         self.o[...].astype(out_BxTxHxE.dtype)))
        return y + self.o_bias[...].astype(y.dtype) if self.c.o_bias else y


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        D, F, dt = c.hidden_size, c.intermediate_size, c.param_dtype
        self.gate = _param(rngs, (D, F), ("embed", "mlp"), dt)
        self.up = _param(rngs, (D, F), ("embed", "mlp"), dt)
        self.down = _param(rngs, (F, D), ("mlp", "embed"), dt)
        if c.mlp_bias:
            self.gate_bias = _param(rngs, (F,), ("mlp",), dt, std=None)
            self.up_bias = _param(rngs, (F,), ("mlp",), dt, std=None)
            self.down_bias = _param(rngs, (D,), ("norm",), dt, std=None)
        self.bias = c.mlp_bias

    def __call__(self, x_BxTxD):
        dt = x_BxTxD.dtype
        g = _adapted(self, "gate", x_BxTxD, x_BxTxD @ self.gate[...].astype(dt))
        u = _adapted(self, "up", x_BxTxD, x_BxTxD @ self.up[...].astype(dt))
        if self.bias:
            g, u = g + self.gate_bias[...].astype(dt), u + self.up_bias[...].astype(dt)
        hidden = jax.nn.silu(g) * u
        y = _adapted(self, "down", hidden, hidden @ self.down[...].astype(dt))
        if self.bias:
            y = y + self.down_bias[...].astype(dt)
        return y


class Block(nnx.Module):
    """Pre-norm decoder layer: h = x + attn(norm(x)); y = h + mlp(norm(h))."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype, rngs)
        self.attn = Attention(c, rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype, rngs)
        self.mlp = MLP(c, rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        if kv is None:
            h = x + self.attn(self.input_norm(x), cos, sin, mask)
            return h + self.mlp(self.post_attn_norm(h))
        a, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, index)
        h = x + a
        return h + self.mlp(self.post_attn_norm(h)), kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated attention cache. k[l], v[l]: [B, K, S, E] keys (after RoPE) and values of layer l;
    `valid_BxS`: slot holds a real token (left padding and not-yet-written slots are False); `end`: int32
    scalar, number of slots written so far (where the next tokens go)."""

    k: list
    v: list
    valid_BxS: jax.Array
    end: jax.Array

    def map_batch(self, fn) -> "KVCache":
        """Applies `fn` to every array with a batch axis (e.g. repeat or a sharding constraint)."""
        return KVCache([fn(x) for x in self.k], [fn(x) for x in self.v], fn(self.valid_BxS), self.end)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty cache of `length` slots for `batch` rows, in the compute dtype (or `dtype`)."""
    dt = dtype or config.compute_dtype
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    zeros = lambda: jnp.zeros(shape, dt)  # noqa: E731
    return KVCache([zeros() for _ in range(config.num_hidden_layers)],
                   [zeros() for _ in range(config.num_hidden_layers)],
                   jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def cached_attention_mask_BxTxS(cache: KVCache, attention_mask_BxT, T: int):
    """[B, T, S]: query t (written at slot end + t) sees slot s iff s <= end + t and slot s is valid, after
    marking slots [end, end + T) valid where `attention_mask_BxT` is 1. Returns (mask, new valid_BxS)."""
    B, S = cache.valid_BxS.shape
    new = jnp.ones((B, T), bool) if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
    valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, new, cache.end, axis=1)
    causal_TxS = jnp.arange(S)[None, :] <= (cache.end + jnp.arange(T))[:, None]
    return valid_BxS[:, None, :] & causal_TxS[None], valid_BxS


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _run_block(block: Block, x, cos, sin, mask):
    return block(x, cos, sin, mask)


class Transformer(nnx.Module):
    """The causal LM. `model(input_ids)` gives logits [B, T, V]; `model(..., return_hidden=True)` gives the
    final (post-norm) hidden states [B, T, D], to be combined with `lm_head_DxV()` by the chunked log-prob
    op so that [B, T, V] logits never exist."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_hidden_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype, rngs)
        if not c.tie_word_embeddings:
            self.lm_head = _param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype)
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(c)))  # a constant, not a Param

    def lm_head_DxV(self):
        """The output projection [D, V] in the compute dtype (the transposed embedding when tied)."""
        w = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.config.compute_dtype)

    def __call__(self, input_ids_BxT, attention_mask=None, positions=None, segment_ids=None, *,
                 return_hidden: bool = False, cache: KVCache | None = None):
        """Logits [B, T, V] (fp32) or, with `return_hidden`, final hidden states [B, T, D].

        With `cache` (a `KVCache`), the T tokens are appended to it (`attention_mask` then marks which of
        them are real, default all; `positions` are required since they continue the cached sequence) and
        `(output, new_cache)` is returned."""
        c = self.config
        B, T = input_ids_BxT.shape
        if cache is not None:
            return self._call_cached(input_ids_BxT, attention_mask, positions, segment_ids, cache, return_hidden)
        if positions is None:
            positions = default_positions(attention_mask, segment_ids, B, T)
        mask = attention_mask_BxTxS(attention_mask, segment_ids, T)
        cos, sin = rope_cos_sin(self.inv_freq[...], positions, c.compute_dtype)
        x = jnp.take(self.embed[...], input_ids_BxT, axis=0).astype(c.compute_dtype)
        x = constrain_batch(x)
        if c.scan_layers:
            x = self._scan_layers(x, cos, sin, mask)
        else:
            run = _run_block
            if c.remat_policy != "none":
                run = nnx.remat(_run_block, policy=_REMAT[c.remat_policy])
            for i, block in enumerate(self.layers):
                with _layer_index(i):
                    x = constrain_batch(run(block, x, cos, sin, mask))  # the residual stream stays split by batch
        h = self.final_norm(x)
        if return_hidden:
            return h
        return jnp.einsum("btd,dv->btv", h, self.lm_head_DxV(), preferred_element_type=jnp.float32)

    def _scan_layers(self, x, cos, sin, mask):
        """The layers as `lax.scan` over their weights stacked on a leading axis (stacked here, each call: the
        parameters stay one module per layer, as checkpoints and shardings name them). Each layer's
        rematerialised forward then runs inside its own loop iteration of the backward pass."""
        graphdef, _ = nnx.split(self.layers[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in self.layers])

        def body(x, xs):
            state, i = xs
            with _layer_index(i):
                return constrain_batch(_run_block(nnx.merge(graphdef, state), x, cos, sin, mask)), None

        if self.config.remat_policy != "none":
            body = jax.checkpoint(body, policy=_REMAT[self.config.remat_policy], prevent_cse=False)
        return jax.lax.scan(body, x, (stacked, jnp.arange(len(self.layers))))[0]

    def _call_cached(self, input_ids_BxT, attention_mask, positions, segment_ids, cache, return_hidden):
        c = self.config
        T = input_ids_BxT.shape[1]
        if positions is None or segment_ids is not None:
            raise ValueError("with a KV cache, pass explicit `positions` and no `segment_ids`")
        mask, valid_BxS = cached_attention_mask_BxTxS(cache, attention_mask, T)
        cos, sin = rope_cos_sin(self.inv_freq[...], positions, c.compute_dtype)
        x = jnp.take(self.embed[...], input_ids_BxT, axis=0).astype(c.compute_dtype)
        ks, vs = [], []
        for block, k, v in zip(self.layers, cache.k, cache.v):
            x, (k, v) = block(x, cos, sin, mask, (k, v), cache.end)
            ks.append(k)
            vs.append(v)
        new_cache = KVCache(ks, vs, valid_BxS, cache.end + T)
        h = self.final_norm(x)
        if return_hidden:
            return h, new_cache
        return jnp.einsum("btd,dv->btv", h, self.lm_head_DxV(), preferred_element_type=jnp.float32), new_cache


def init_model(config: ModelConfig, seed: int = 0, mesh=None) -> Transformer:
    """A randomly initialised model (std 0.02 weights, unit norms), created directly in its shardings."""
    from align_jax.parallel import create_sharded

    return create_sharded(lambda rngs: Transformer(config, rngs=rngs), mesh, seed=seed)
