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
filter exists at all is static (`filter_top_k`, `filter_top_p`), so that disabled filters cost no sort.
Both filters share one ascending sort of the vocabulary. Where several tokens tie at a threshold, all are
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
    asc_BxV = jnp.sort(z_BxV, axis=-1)
    if filter_top_k:
        k = jnp.asarray(top_k, jnp.int32)
        k = jnp.where((k <= 0) | (k > V), V, k)
        kth_Bx1 = jax.lax.dynamic_slice_in_dim(asc_BxV, V - k, 1, axis=-1)  # k-th largest
        z_BxV = jnp.where(z_BxV < kth_Bx1, -jnp.inf, z_BxV)
        asc_BxV = jnp.where(asc_BxV < kth_Bx1, -jnp.inf, asc_BxV)  # still ascending
    if filter_top_p:
        p = jnp.asarray(top_p, _F32)
        cum_BxV = jnp.cumsum(jax.nn.softmax(asc_BxV, axis=-1), axis=-1)
        drop_BxV = (cum_BxV <= 1.0 - p) & (p < 1.0)
        drop_BxV = drop_BxV.at[..., -1].set(False)
        n_drop_Bx1 = jnp.sum(drop_BxV, axis=-1, keepdims=True)  # the dropped set is a prefix (c is monotone)
        thresh_Bx1 = jnp.take_along_axis(asc_BxV, n_drop_Bx1, axis=-1)
        z_BxV = jnp.where(z_BxV < thresh_Bx1, -jnp.inf, z_BxV)
    return z_BxV


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
