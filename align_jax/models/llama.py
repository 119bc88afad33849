"""A decoder-only transformer in Flax NNX covering the Llama family exactly as transformers implements it.

Shapes: B batch, T tokens, D hidden, H query heads, K key/value heads, G = H/K, E head dim, F MLP features,
V vocabulary. Parameters are stored in "inputs x outputs" layout with explicit head axes (q: [D, H, E]) and
carry logical axis names (`logical_axes` metadata) that `align_jax.parallel.RULES` maps to the mesh.

Numerics follow transformers' eager implementation (`modeling_llama.py`, `modeling_qwen2.py`,
`modeling_qwen3.py`): RMSNorm in fp32 then cast back; RoPE with `rotate_half`, cos/sin computed in fp32 from
`inv_freq @ positions`; attention softmax in fp32; SwiGLU MLP `down(silu(gate(x)) * up(x))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.models.config import ModelConfig, rope_inv_freq

_NEG = float(jnp.finfo(jnp.float32).min)


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

    def __call__(self, x_BxTxD, cos, sin, mask_BxTxS):
        c, dt = self.c, x_BxTxD.dtype
        B, T, _ = x_BxTxD.shape
        q = jnp.einsum("btd,dhe->bthe", x_BxTxD, self.q[...].astype(dt))
        k = jnp.einsum("btd,dke->btke", x_BxTxD, self.k[...].astype(dt))
        v = jnp.einsum("btd,dke->btke", x_BxTxD, self.v[...].astype(dt))
        if c.attention_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        K, G = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        q = q.reshape(B, T, K, G, c.head_dim)
        scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (c.head_dim ** -0.5)
        scores = jnp.where(mask_BxTxS[:, None, None], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bske->btkge", probs, v).reshape(B, T, c.num_attention_heads, c.head_dim)
        y = jnp.einsum("bthe,hed->btd", out, self.o[...].astype(dt))
        if c.o_bias:
            y = y + self.o_bias[...].astype(dt)
        return y


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
        g = x_BxTxD @ self.gate[...].astype(dt)
        u = x_BxTxD @ self.up[...].astype(dt)
        if self.bias:
            g, u = g + self.gate_bias[...].astype(dt), u + self.up_bias[...].astype(dt)
        y = (jax.nn.silu(g) * u) @ self.down[...].astype(dt)
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

    def __call__(self, x, cos, sin, mask):
        h = x + self.attn(self.input_norm(x), cos, sin, mask)
        return h + self.mlp(self.post_attn_norm(h))


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
                 return_hidden: bool = False):
        c = self.config
        B, T = input_ids_BxT.shape
        if positions is None:
            positions = default_positions(attention_mask, segment_ids, B, T)
        mask = attention_mask_BxTxS(attention_mask, segment_ids, T)
        cos, sin = rope_cos_sin(self.inv_freq[...], positions, c.compute_dtype)
        x = jnp.take(self.embed[...], input_ids_BxT, axis=0).astype(c.compute_dtype)
        run = _run_block
        if c.remat_policy != "none":
            run = nnx.remat(_run_block, policy=_REMAT[c.remat_policy])
        for block in self.layers:
            x = run(block, x, cos, sin, mask)
        h = self.final_norm(x)
        if return_hidden:
            return h
        return jnp.einsum("btd,dv->btv", h, self.lm_head_DxV(), preferred_element_type=jnp.float32)


def init_model(config: ModelConfig, seed: int = 0, mesh=None) -> Transformer:
    """A randomly initialised model (std 0.02 weights, unit norms), created directly in its shardings."""
    from align_jax.parallel import create_sharded

    return create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(seed)), mesh)
