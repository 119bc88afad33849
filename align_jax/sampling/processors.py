"""Logit processing for sampling: temperature, then top-k, then top-p (the order of transformers'
`TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper` and of vLLM's sampler).

With z = logits / temperature (fp32), tokens outside the allowed set get -inf:

    top-k:  keep v iff z_v >= (k-th largest z); k <= 0 or k >= V: off     (ties with the k-th value kept, as HF)
    top-p:  sort ascending, c_j = sum_{i<=j} softmax(z)_(i) (after top-k); drop the prefix with c_j <= 1 - p,
            always keep the largest (HF `TopPLogitsWarper` / vLLM `apply_top_k_top_p`, min_tokens_to_keep 1);
            p >= 1: off

The sampling distribution is softmax of the processed logits; its log-probs ("sampling logprobs", what
vLLM/TRL report) are `log_softmax(process_logits(...))`.

The values (temperature, k, p) may be traced, so one compiled sampler serves all settings; whether each
filter exists at all is static (`filter_top_k`, `filter_top_p`), so that disabled filters cost nothing.
Neither filter sorts: each threshold is found by bisection over the 2^32 float32 bit patterns (32 passes
over the vocabulary, `_largest_key`): top-k's is the largest value with at least k logits >= it (the k-th
largest); top-p's is the largest value t whose lower mass sum(softmax(z)[z < t]) is <= 1 - p, which is the
value at which the sorted rule above starts keeping tokens. Where several tokens tie at a threshold, all are
kept (HF drops some of them by sort order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _is_off(value, off) -> bool:
    """True when `value` is a Python number that disables its filter (so the filter is left out statically)."""
    return isinstance(value, (int, float)) and off(value)


def process_logits(logits_BxV, temperature=1.0, top_k=0, top_p=1.0, *, filter_top_k: bool | None = None,
                   filter_top_p: bool | None = None):
    """z = logits / temperature, then top-k, then top-p; returns fp32 [B, V] with -inf outside the allowed set.

    `filter_top_k` / `filter_top_p` (static) default to "unless the value is a Python number that turns the
    filter off"; traced values keep the filter in the program (where the value may still turn it off)."""
    if filter_top_k is None:
        filter_top_k = not _is_off(top_k, lambda k: k <= 0 or k >= logits_BxV.shape[-1])
    if filter_top_p is None:
        filter_top_p = not _is_off(top_p, lambda p: p >= 1.0)
    z_BxV = logits_BxV.astype(_F32) / jnp.asarray(temperature, _F32)
    if not (filter_top_k or filter_top_p):
        return z_BxV
    V = z_BxV.shape[-1]
    key_BxV = _sortable(z_BxV)
    if filter_top_k:
        k = jnp.asarray(top_k, jnp.int32)
        k = jnp.where((k <= 0) | (k > V), V, k)
        # k-th largest = the largest key t with #{z >= t} >= k
        kth_Bx1 = _largest_key(key_BxV, lambda t_Bx1: jnp.sum(key_BxV >= t_Bx1, axis=-1) >= k)
        z_BxV = jnp.where(key_BxV < kth_Bx1, -jnp.inf, z_BxV)
    if filter_top_p:
        p = jnp.asarray(top_p, _F32)
        probs_BxV = jax.nn.softmax(z_BxV, axis=-1)
        # the sorted rule's threshold = the largest value t with (mass of tokens below t) <= 1 - p
        thresh_Bx1 = _largest_key(
            key_BxV, lambda t_Bx1: jnp.sum(jnp.where(key_BxV < t_Bx1, probs_BxV, 0.0), axis=-1) <= 1.0 - p)
        thresh_Bx1 = jnp.where(p < 1.0, thresh_Bx1, jnp.min(key_BxV, axis=-1, keepdims=True))  # p = 1: off
        z_BxV = jnp.where(key_BxV < thresh_Bx1, -jnp.inf, z_BxV)
    return z_BxV


def _sortable(z):
    """float32 -> uint32 with the same order (NaN-free input; -0.0 is first made +0.0, as they compare equal)."""
    b = jax.lax.bitcast_convert_type(jnp.where(z == 0, jnp.zeros_like(z), z), jnp.uint32)
    return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))


def _largest_key(key_BxV, ok):
    """Per row, the largest t in [min key, max key] with ok(t) (ok: [B, 1] uint32 -> [B] bool, true at the min
    key and monotone: true up to some t, false above). Bisection over the 2^32 keys: 32 steps, each one pass
    over [B, V] (instead of a sort)."""
    lo_B, hi_B = jnp.min(key_BxV, axis=-1), jnp.max(key_BxV, axis=-1)

    def step(_, c):
        lo_B, hi_B = c
        mid_B = lo_B + (hi_B - lo_B) // 2 + 1  # in (lo, hi] while lo < hi
        live_B = lo_B < hi_B
        good_B = ok(mid_B[:, None])
        return jnp.where(live_B & good_B, mid_B, lo_B), jnp.where(live_B & ~good_B, mid_B - 1, hi_B)

    lo_B, _ = jax.lax.fori_loop(0, 32, step, (lo_B, hi_B), unroll=4)
    return lo_B[:, None]


def token_logp(logits_BxV, tokens_B):
    """log_softmax(logits)[token] per row (fp32)."""
    logq_BxV = jax.nn.log_softmax(logits_BxV.astype(_F32), axis=-1)
    return jnp.take_along_axis(logq_BxV, tokens_B[:, None].astype(jnp.int32), axis=-1)[:, 0]


def greedy_logp(logits_BxV):
    """log_softmax(logits)[argmax] = -log sum_v exp(logits_v - max): `token_logp` at the argmax, bit for bit
    (there the shifted logit is exactly 0), without the gather."""
    x = logits_BxV.astype(_F32)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return -jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def sample_token(logits_BxV, key, *, greedy: bool, temperature=1.0, top_k=0, top_p=1.0,
                 filter_top_k: bool | None = None, filter_top_p: bool | None = None):
    """One token per row. Returns (token, sampling logp, model logp).

    model logp = log_softmax(logits)[token] (temperature 1, unfiltered). Sampling: token ~ softmax(z) with
    z = process_logits(logits) (Gumbel-max via `jax.random.categorical`), sampling logp = log_softmax(z)[token].
    Greedy: token = argmax(logits) (temperature / top-k / top-p ignored, as transformers' do_sample=False) and
    the sampling logp is the model logp."""
    logits_BxV = logits_BxV.astype(_F32)
    if greedy:
        tok_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        model_logp_B = greedy_logp(logits_BxV)
        return tok_B, model_logp_B, model_logp_B
    z_BxV = process_logits(logits_BxV, temperature, top_k, top_p, filter_top_k=filter_top_k,
                           filter_top_p=filter_top_p)
    tok_B = jax.random.categorical(key, z_BxV, axis=-1).astype(jnp.int32)
    return tok_B, token_logp(z_BxV, tok_B), token_logp(logits_BxV, tok_B)
