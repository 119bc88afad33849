"""One-token decode step for the sampler's `lax.while_loop`, with the weights transposed once per call.

At decode time every matrix product is [R, D] x [D, F] with R (rows) small: the step streams every weight
from memory once and does little arithmetic with it, so its speed is the speed of reading the weights. Two
layout choices make that reading cheap on CPU (measured in benchmarks/sampler_speed.py, see the README):

- weights as [F, D] ("output x input", torch's `Linear` layout) copies made once before the loop by
  `decode_weights` (XLA would fold a transpose inside the loop back into the dot), used as the *left* operand
  of each product: y^T = W x^T (`_mm`). XLA:CPU's matmul library repacks the right operand of a dot on every
  call; with the weight on the left only the tiny [D, R] activations are repacked
  (benchmarks/decode_matmul.py times the products alone).
- keys cached as [R, K, E, S] during decoding (`decode_cache`, one transpose after the prefill), so that q.k
  reduces over a non-minor axis and vectorises along the S slots.

`decode_step` is `Transformer._call_cached` for one token per row written with them:

    x = embed[token]
    per layer:  a = rmsnorm(x);  q, k, v = a Wq, a Wk, a Wv (+ bias; per-head RMSNorm on q, k for Qwen3);
                RoPE at `pos`; k, v written to slot `cache.end`;
                p = softmax(q k^T / sqrt(E), masked to valid slots <= end) over the S slots (fp32; both
                products as broadcast multiply + sum, faster than XLA:CPU's batched dots at one query);
                h = x + (p v) Wo (+ bias);  x = h + down(silu(gate(rmsnorm(h))) * up(rmsnorm(h)))
    returns rmsnorm_final(x) [R, D] and the cache (end + 1)

Same equations, dtypes and cache contents as the model's cached forward; only the operand layout of the
products (hence the order of the fp32 additions inside them) differs, so logits agree with the full forward
to fp32 rounding (tests/test_sampling.py checks 1e-5). The copies cost one extra read and write of the
weights and keys per `generate` call, and their memory while it runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from align_jax.models.llama import KVCache, Transformer, NEG_INF, apply_rope, cached_attention_mask_BxTxS, rope_cos_sin


def decode_weights(model: Transformer) -> dict:
    """Transposed ([out, in]) copies in the compute dtype. Per layer: qkv [(H + 2K) * E, D] (q, k, v stacked:
    one product instead of three), o [D, H * E], gate_up [2F, D] (gate, up stacked), down [D, F]; the output
    head [V, D] (the embedding itself when tied). Stacking changes no result: each output row is its own dot
    product over D."""
    c = model.config
    dt = c.compute_dtype

    def t(w, n_in):  # [in..., out...] -> [out, in]
        return w.astype(dt).reshape(n_in, -1).T

    D = c.hidden_size
    layers = []
    for block in model.layers:
        a, m = block.attn, block.mlp
        layers.append(dict(qkv=jnp.concatenate([t(a.q[...], D), t(a.k[...], D), t(a.v[...], D)], 0),
                           o=t(a.o[...], c.num_attention_heads * c.head_dim),
                           gate_up=jnp.concatenate([t(m.gate[...], D), t(m.up[...], D)], 0),
                           down=t(m.down[...], c.intermediate_size)))
    head = model.embed[...] if c.tie_word_embeddings else model.lm_head[...].T
    return dict(layers=layers, head_VxD=head.astype(dt))


def _mm(x_RxD, w_FxD, **kw):
    """x @ w.T computed as (w @ x.T).T: the weight is the dot's left operand. XLA:CPU's matmul library packs
    its right operand on every call; at R << D, F that is a full extra pass over the weight, while packing the
    [D, R] activations costs nothing (`python benchmarks/decode_matmul.py`: the benchmark model's 17 products
    at 8 rows, 1.44 ms per step x-first vs 0.75 ms weight-first; 0.28 ms at 1 row either way).
    The barrier keeps XLA from folding the transpose back into an x-first dot. Same dot products."""
    y_FxR = jax.lax.optimization_barrier(jnp.einsum("fd,rd->fr", w_FxD, x_RxD, **kw))
    return y_FxR.T


def head_logits(w: dict, h_RxD):
    """Logits [R, V] (fp32) = h @ head (the [V, D] copy of `decode_weights`)."""
    return _mm(h_RxD, w["head_VxD"], preferred_element_type=jnp.float32)


def decode_cache(cache: KVCache) -> KVCache:
    """The model's cache ([R, K, S, E] keys) in `decode_step`'s layout: keys as [R, K, E, S] (values unchanged),
    so that the scores q.k reduce over a non-minor axis, vectorised along the S slots."""
    return KVCache([jnp.swapaxes(k, 2, 3) for k in cache.k], cache.v, cache.valid_BxS, cache.end)


def _attention(block, w, x_RxD, cos, sin, mask_RxS, kT_cache, v_cache, end):
    """`Attention.__call__` with kv= for T = 1 (cos/sin [R, 1, E]; keys [R, K, E, S], values [R, K, S, E])."""
    c, dt = block.attn.c, x_RxD.dtype
    R = x_RxD.shape[0]
    H, K, E = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attn = block.attn
    qkv = _mm(x_RxD, w["qkv"])
    q = qkv[:, :H * E].reshape(R, 1, H, E)
    k = qkv[:, H * E:(H + K) * E].reshape(R, 1, K, E)
    v = qkv[:, (H + K) * E:].reshape(R, 1, K, E)
    if c.attention_bias:
        q, k, v = q + attn.q_bias[...].astype(dt), k + attn.k_bias[...].astype(dt), v + attn.v_bias[...].astype(dt)
    if c.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kT_cache = jax.lax.dynamic_update_slice_in_dim(kT_cache, jnp.transpose(k, (0, 2, 3, 1)).astype(kT_cache.dtype),
                                                   end, axis=3)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype), end, axis=2)
    # One query per row: the two attention products are broadcast multiply + reduce rather than batched dots
    # (XLA:CPU runs R*K tiny [G, E] x [E, S] dots slowly; same sums, fp32 rounding order only).
    f32 = jnp.float32
    qg = q.reshape(R, K, H // K, E, 1).astype(f32)
    scores = jnp.sum(qg * kT_cache[:, :, None].astype(f32), axis=-2)  # [R, K, G, S]
    scores = scores * (E ** -0.5)
    scores = jnp.where(mask_RxS[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.sum((probs[..., None] * v_cache[:, :, None].astype(dt)).astype(f32), axis=-2)  # [R, K, G, E]
    out = out.astype(dt).reshape(R, H * E)
    y = _mm(out, w["o"])
    if c.o_bias:
        y = y + attn.o_bias[...].astype(dt)
    return y, kT_cache, v_cache


def _mlp(mlp, w, x_RxD):
    dt = x_RxD.dtype
    gu = _mm(x_RxD, w["gate_up"])
    g, u = jnp.split(gu, 2, axis=-1)
    if mlp.bias:
        g, u = g + mlp.gate_bias[...].astype(dt), u + mlp.up_bias[...].astype(dt)
    y = _mm(jax.nn.silu(g) * u, w["down"])
    if mlp.bias:
        y = y + mlp.down_bias[...].astype(dt)
    return y


def decode_step(model: Transformer, w: dict, tokens_R, positions_R, cache: KVCache):
    """Appends one token per row at slot `cache.end` (position `positions_R`); returns the final hidden
    state [R, D] and the new cache. `cache` is in `decode_cache`'s layout (keys [R, K, E, S]). Equals
    `model(tokens[:, None], None, positions[:, None], cache=model_cache, return_hidden=True)` up to fp32
    rounding."""
    c = model.config
    mask_Rx1xS, valid_RxS = cached_attention_mask_BxTxS(cache, None, 1)
    cos, sin = rope_cos_sin(model.inv_freq[...], positions_R[:, None], c.compute_dtype)
    x = jnp.take(model.embed[...], tokens_R, axis=0).astype(c.compute_dtype)
    ks, vs = [], []
    for block, wl, k, v in zip(model.layers, w["layers"], cache.k, cache.v):
        a, k, v = _attention(block, wl, block.input_norm(x), cos, sin, mask_Rx1xS[:, 0], k, v, cache.end)
        h = x + a
        x = h + _mlp(block.mlp, wl, block.post_attn_norm(h))
        ks.append(k)
        vs.append(v)
    return model.final_norm(x), KVCache(ks, vs, valid_RxS, cache.end + 1)
