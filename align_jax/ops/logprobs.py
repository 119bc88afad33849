"""Per-token log-probs and entropies from hidden states and the LM head, chunked over the vocabulary.

With logits l = hidden @ lm_head (fp32 accumulation), for every token (b, t):

    logp[b, t]    = l[b, t, y[b, t]] - logsumexp_v l[b, t, v]
    entropy[b, t] = -sum_v p[b, t, v] log p[b, t, v],     p = softmax_v l[b, t, :]

`naive_token_logps` materialises the [B, T, V] fp32 logits (reference). `token_logps` walks the vocabulary
in chunks of C columns with `lax.scan`, carrying an online logsumexp (running max m, rescaled sum
s = sum exp(l - m)) and, for the entropy, S = sum exp(l - m) (l - m), so that at the end

    logsumexp = m + log s,    logp = (l_y - m) - log s,    entropy = log s - S / s.

Its gradient is a `jax.custom_vjp` that recomputes each logits chunk in the backward pass from the saved
(m, log s, entropy) and the closed-form logit cotangent

    d logp / d l_v    = 1[v = y] - p_v
    d entropy / d l_v = -p_v (log p_v + entropy)

so neither pass holds more than one [B*T, C] logits chunk (plus the [D, V] lm_head gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _logits(h_NxD, w_DxC):
    """h @ w with fp32 accumulation, whatever the input dtypes."""
    return lax.dot_general(h_NxD, w_DxC, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _softcap(z, logit_softcap):
    """Gemma-2 style soft cap: c * tanh(z / c) (identity when c is None)."""
    return z if logit_softcap is None else logit_softcap * jnp.tanh(z / logit_softcap)


def naive_token_logps(hidden_BxTxD, lm_head_DxV, targets_BxT, *, return_entropy=False, logit_softcap=None):
    """Reference: logp = log_softmax(hidden @ lm_head)[target]; entropy = -sum p log p. Materialises [B,T,V] fp32."""
    logits_BxTxV = _softcap(
        lax.dot_general(hidden_BxTxD, lm_head_DxV, (((2,), (0,)), ((), ())), preferred_element_type=_F32),
        logit_softcap,
    )
    logq_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    logps_BxT = jnp.take_along_axis(logq_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not return_entropy:
        return logps_BxT
    entropy_BxT = -jnp.sum(jnp.exp(logq_BxTxV) * logq_BxTxV, axis=-1)
    return logps_BxT, entropy_BxT


# ----------------------------------------------------------------------------------------------------------
# Chunk geometry. Chunk i covers columns [start_i, start_i + C) with start_i = min(i*C, V - C): the last
# chunk is shifted left to stay inside [0, V) (no padded copy of lm_head), and its columns < i*C, already
# seen by chunk i-1, are masked out. Hence every column is counted exactly once.
# ----------------------------------------------------------------------------------------------------------


def _chunk(h_NxD, w_DxV, i, chunk_size, logit_softcap):
    """Logits of chunk i, the global column ids and the validity mask of its columns."""
    vocab = w_DxV.shape[1]
    first = i * chunk_size
    start = jnp.minimum(first, vocab - chunk_size)
    w_DxC = lax.dynamic_slice_in_dim(w_DxV, start, chunk_size, axis=1)
    cols_C = start + lax.iota(jnp.int32, chunk_size)
    l_NxC = _softcap(_logits(h_NxD, w_DxC), logit_softcap)
    return l_NxC, start, w_DxC, cols_C, cols_C >= first


def _online_step(carry, i, h_NxD, w_DxV, y_N, chunk_size, logit_softcap, with_entropy):
    """Fold chunk i into (m, s, l_y, S): m = max l, s = sum exp(l-m), l_y = l[y], S = sum exp(l-m)(l-m).

    When the max moves m -> m':  s' = e^{m-m'} s + sum_chunk e^{l-m'},
                                 S' = e^{m-m'} [S + (m-m') s] + sum_chunk e^{l-m'} (l-m').
    The max is only a shift, so it is wrapped in stop_gradient (exact: the result does not depend on it).
    """
    m_N, s_N, ly_N, S_N = carry
    l_NxC, _, _, cols_C, valid_C = _chunk(h_NxD, w_DxV, i, chunk_size, logit_softcap)
    l_NxC = jnp.where(valid_C, l_NxC, -jnp.inf)
    m_new_N = lax.stop_gradient(jnp.maximum(m_N, jnp.max(l_NxC, axis=-1)))
    scale_N = jnp.exp(m_N - m_new_N)  # 0 on the first chunk (m = -inf)
    e_NxC = jnp.exp(l_NxC - m_new_N[:, None])  # 0 on masked columns
    hit_NxC = (cols_C[None, :] == y_N[:, None]) & valid_C
    ly_N = ly_N + jnp.sum(jnp.where(hit_NxC, l_NxC, 0.0), axis=-1)
    if with_entropy:
        shift_N = jnp.where(jnp.isfinite(m_N), m_N - m_new_N, 0.0)
        d_NxC = jnp.where(valid_C, l_NxC - m_new_N[:, None], 0.0)
        S_N = scale_N * (S_N + shift_N * s_N) + jnp.sum(e_NxC * d_NxC, axis=-1)
    s_N = s_N * scale_N + jnp.sum(e_NxC, axis=-1)
    return (m_new_N, s_N, ly_N, S_N), None


def _scan_stats(h_NxD, w_DxV, y_N, chunk_size, logit_softcap, with_entropy, remat=False):
    """Scan all chunks; returns (m, log s, l_y - m, entropy) per row (entropy = log s - S/s, or 0)."""
    n = h_NxD.shape[0]
    num_chunks = -(-w_DxV.shape[1] // chunk_size)
    step = functools.partial(
        _online_step, h_NxD=h_NxD, w_DxV=w_DxV, y_N=y_N, chunk_size=chunk_size,
        logit_softcap=logit_softcap, with_entropy=with_entropy,
    )
    if remat:
        step = jax.checkpoint(step)
    init = (jnp.full((n,), -jnp.inf, _F32), jnp.zeros((n,), _F32), jnp.zeros((n,), _F32), jnp.zeros((n,), _F32))
    (m_N, s_N, ly_N, S_N), _ = lax.scan(step, init, jnp.arange(num_chunks))
    logs_N = jnp.log(s_N)
    ent_N = logs_N - S_N / s_N if with_entropy else jnp.zeros_like(logs_N)
    return m_N, logs_N, ly_N - m_N, ent_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(h_NxD, w_DxV, y_N, chunk_size, logit_softcap, with_entropy):
    return _chunked_fwd(h_NxD, w_DxV, y_N, chunk_size, logit_softcap, with_entropy)[0]


def _chunked_fwd(h_NxD, w_DxV, y_N, chunk_size, logit_softcap, with_entropy):
    m_N, logs_N, lym_N, ent_N = _scan_stats(h_NxD, w_DxV, y_N, chunk_size, logit_softcap, with_entropy)
    logp_N = lym_N - logs_N
    return (logp_N, ent_N), (h_NxD, w_DxV, y_N, m_N, logs_N, ent_N)


def _chunked_bwd(chunk_size, logit_softcap, with_entropy, res, cts):
    h_NxD, w_DxV, y_N, m_N, logs_N, ent_N = res
    g_logp_N, g_ent_N = cts
    num_chunks = -(-w_DxV.shape[1] // chunk_size)

    def body(carry, i):
        dh_NxD, dw_DxV = carry
        l_NxC, start, w_DxC, cols_C, valid_C = _chunk(h_NxD, w_DxV, i, chunk_size, logit_softcap)
        logq_NxC = (l_NxC - m_N[:, None]) - logs_N[:, None]  # log p
        p_NxC = jnp.exp(logq_NxC)
        hit_NxC = cols_C[None, :] == y_N[:, None]
        g_NxC = jnp.where(hit_NxC, g_logp_N[:, None], 0.0) - g_logp_N[:, None] * p_NxC
        if with_entropy:
            g_NxC = g_NxC - g_ent_N[:, None] * p_NxC * (logq_NxC + ent_N[:, None])
        if logit_softcap is not None:
            g_NxC = g_NxC * (1.0 - jnp.square(l_NxC / logit_softcap))
        g_NxC = jnp.where(valid_C, g_NxC, 0.0)
        dh_NxD = dh_NxD + lax.dot_general(g_NxC, w_DxC, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        dw_DxC = lax.dot_general(h_NxD, g_NxC, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
        # Masked (already written) columns of the shifted last chunk get + 0: exact in any dtype.
        old_DxC = lax.dynamic_slice_in_dim(dw_DxV, start, chunk_size, axis=1)
        dw_DxV = lax.dynamic_update_slice_in_dim(dw_DxV, old_DxC + dw_DxC.astype(dw_DxV.dtype), start, axis=1)
        return (dh_NxD, dw_DxV), None

    init = (jnp.zeros(h_NxD.shape, _F32), jnp.zeros(w_DxV.shape, w_DxV.dtype))
    (dh_NxD, dw_DxV), _ = lax.scan(body, init, jnp.arange(num_chunks))
    return dh_NxD.astype(h_NxD.dtype), dw_DxV, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _prepare(hidden_BxTxD, lm_head_DxV, targets_BxT, chunk_size, compute_dtype):
    if compute_dtype is not None:
        hidden_BxTxD = hidden_BxTxD.astype(compute_dtype)
        lm_head_DxV = lm_head_DxV.astype(compute_dtype)
    d, vocab = lm_head_DxV.shape
    chunk_size = int(min(chunk_size, vocab))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return hidden_BxTxD.reshape(-1, d), lm_head_DxV, targets_BxT.reshape(-1).astype(jnp.int32), chunk_size


def token_logps(
    hidden_BxTxD,
    lm_head_DxV,
    targets_BxT,
    *,
    chunk_size=8192,
    return_entropy=False,
    compute_dtype=None,
    logit_softcap=None,
):
    """Per-token log p(target) (and entropy) without materialising the [B, T, V] logits.

    logits = softcap(hidden @ lm_head) with fp32 accumulation (after casting both to `compute_dtype` if given;
    softcap(z) = c tanh(z / c) if `logit_softcap` = c, else identity), and

        logps[b, t]   = logits[b, t, targets[b, t]] - logsumexp_v logits[b, t, v]
        entropy[b, t] = -sum_v p log p,   p = softmax_v logits[b, t, :]

    computed by an online logsumexp over vocabulary chunks of `chunk_size` columns (V need not be divisible
    by it); gradients w.r.t. hidden and lm_head by a custom VJP that recomputes each chunk (see module doc).
    Targets must lie in [0, V); callers mask padding themselves. Outputs are float32 [B, T]; returns
    `logps` or `(logps, entropy)` if `return_entropy`.
    """
    batch_shape = targets_BxT.shape
    h_NxD, w_DxV, y_N, chunk_size = _prepare(hidden_BxTxD, lm_head_DxV, targets_BxT, chunk_size, compute_dtype)
    logp_N, ent_N = _chunked(h_NxD, w_DxV, y_N, chunk_size, logit_softcap, bool(return_entropy))
    if return_entropy:
        return logp_N.reshape(batch_shape), ent_N.reshape(batch_shape)
    return logp_N.reshape(batch_shape)


def token_logps_remat(
    hidden_BxTxD,
    lm_head_DxV,
    targets_BxT,
    *,
    chunk_size=8192,
    return_entropy=False,
    compute_dtype=None,
    logit_softcap=None,
):
    """Same values as `token_logps`, differentiated by plain autodiff through `lax.scan` with a
    `jax.checkpoint`-ed chunk body (no custom VJP). Kept as an independent cross-check and for the benchmark."""
    batch_shape = targets_BxT.shape
    h_NxD, w_DxV, y_N, chunk_size = _prepare(hidden_BxTxD, lm_head_DxV, targets_BxT, chunk_size, compute_dtype)
    _, logs_N, lym_N, ent_N = _scan_stats(
        h_NxD, w_DxV, y_N, chunk_size, logit_softcap, bool(return_entropy), remat=True
    )
    logp_N = (lym_N - logs_N).reshape(batch_shape)
    return (logp_N, ent_N.reshape(batch_shape)) if return_entropy else logp_N
