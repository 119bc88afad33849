"""Shared numerics for the loss library: fp32 casting, masked reductions, stable log1mexp.

Every loss in `align_jax.losses` casts its floating inputs to float32 first (`to_f32`), so a bf16 input gives
exactly the fp32 answer on the bf16-rounded values. Masked reductions never divide by zero: an empty mask gives 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Exponents of log-ratios (importance ratios, k3 KL) are clamped from above at this value, so that extreme
# log-probs (e.g. -1e4 against 0) give large but finite losses and gradients instead of inf / NaN. Below the
# clamp the result is exact; |log ratio| > 20 (a ratio above 4.8e8) only happens for pathological tokens.
MAX_LOG_RATIO = 20.0


def to_f32(x):
    """Cast an array (any float/int/bool dtype) to float32; `None` stays `None`."""
    if x is None:
        return None
    return jnp.asarray(x, dtype=jnp.float32)


def masked_sum(x, mask, axis=None):
    """sum(x * mask) over `axis`; entries where mask == 0 are ignored even when they are inf/NaN."""
    x = to_f32(x)
    mask = to_f32(mask)
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)


def masked_count(mask, axis=None):
    """Number of unmasked entries, as float32."""
    return jnp.sum(to_f32(mask), axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / max(sum(mask), 1): the masked mean, 0 for an empty mask."""
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), 1.0)


def safe_div(num, den):
    """num / max(den, 1) (for counts)."""
    return num / jnp.maximum(den, 1.0)


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, numerically stable (Maechler 2012), as in TRL's ORPO `log1mexp`.

    Branch at -log 2: log1p(-exp(x)) for x < -log 2, log(-expm1(x)) otherwise. Unlike TRL, x is clamped to at
    most -1e-6 first, so x = 0 (a probability-one or zero-length completion) gives log(1e-6)-ish ≈ -13.8 and a
    finite gradient instead of -inf. Both branches are finite on the clamped domain, so the gradient of the
    `where` is finite too.
    """
    x = jnp.minimum(to_f32(x), -1e-6)
    t = -0.6931471805599453
    return jnp.where(x < t, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def clamped_exp(log_ratio):
    """exp(min(log_ratio, MAX_LOG_RATIO)); see `MAX_LOG_RATIO`."""
    return jnp.exp(jnp.minimum(log_ratio, MAX_LOG_RATIO))


def log_sigmoid(x):
    """log σ(x), stable for |x| large."""
    return jax.nn.log_sigmoid(x)


def soft_label_bt(delta, p):
    """−(p·logσ(Δ) + (1−p)·logσ(−Δ)): Bradley–Terry NLL with preference probability p (p = 1: −logσ(Δ))."""
    return -(p * log_sigmoid(delta) + (1.0 - p) * log_sigmoid(-delta))


def is_static_number(x) -> bool:
    """True for Python / numpy scalars (hyper-parameters we may validate), False for traced arrays."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)
