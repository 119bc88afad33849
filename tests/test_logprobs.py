"""Vocabulary-chunked token log-probs / entropy vs the naive log-softmax (values and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax.ops import naive_token_logps, token_logps, token_logps_remat

TOL = 1e-5


def _inputs(b, t, d, v, seed=0, scale=1.0, dtype=jnp.float32):
    """numpy-generated inputs (no per-shape JAX compiles)."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(scale * rng.standard_normal((b, t, d)), dtype)
    lm_head = jnp.asarray(rng.standard_normal((d, v)) * 3.0 / np.sqrt(d), dtype)
    # Cover every id (incl. the overlap of the shifted last chunk), then random ones.
    targets = np.concatenate([np.arange(v), rng.integers(0, v, b * t)])[: b * t].reshape(b, t)
    cot = jnp.asarray(rng.standard_normal((2, b, t)), jnp.float32)  # cotangents for logps and entropy
    return hidden, lm_head, jnp.asarray(targets, jnp.int32), cot


def _loss(fn, cot, **kw):
    """L = sum c0 * logp + sum c1 * entropy: generic cotangents for both outputs."""

    def loss(hidden, lm_head, targets):
        logp, ent = fn(hidden, lm_head, targets, return_entropy=True, **kw)
        return jnp.sum(cot[0] * logp) + jnp.sum(cot[1] * ent)

    return loss


@functools.partial(jax.jit, static_argnames=("impl", "kw", "logps_only"))
def _both(hidden, lm_head, targets, cot, impl, kw=(), logps_only=False):
    """One compile: logp, entropy and their VJP wrt (hidden, lm_head) for `impl` and for the naive reference;
    with `logps_only` also logp and its VJP from the return_entropy=False path (custom VJP without entropy)."""
    kw = dict(kw)
    ref_kw = {k: v for k, v in kw.items() if k == "logit_softcap"}
    out = []
    for fn, fkw in ((impl, kw), (naive_token_logps, ref_kw)):
        both = lambda h, w: fn(h, w, targets, return_entropy=True, **fkw)  # noqa: E731
        only = lambda h, w: fn(h, w, targets, **fkw)  # noqa: E731  (custom VJP without the entropy branch)
        (logp, ent), vjp = jax.vjp(both, hidden, lm_head)
        res = (logp, ent) + vjp((cot[0], cot[1]))
        if logps_only:
            logp_only, vjp_only = jax.vjp(only, hidden, lm_head)
            res = res + (logp_only,) + vjp_only(cot[0])
        out.append(res)
    return out


def _assert_match(got, ref, atol=TOL):
    """Every output of `_both` (values and grads) equals the reference within atol."""
    assert got[0].dtype == got[1].dtype == jnp.float32
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, atol=atol)
    for r in ref[2:4]:
        assert np.abs(np.asarray(r)).max() > 1e-2  # the gradients compared are not trivially zero


def _numpy_ref(hidden, lm_head, targets):
    """float64 numpy log-softmax, independent of JAX."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp = np.take_along_axis(logq, np.asarray(targets)[..., None], -1)[..., 0]
    return logp, -(np.exp(logq) * logq).sum(-1)


def test_naive_matches_float64_numpy():
    hidden, lm_head, targets, _ = _inputs(2, 5, 8, 11)
    logp, ent = jax.jit(functools.partial(naive_token_logps, return_entropy=True))(hidden, lm_head, targets)
    ref_logp, ref_ent = _numpy_ref(hidden, lm_head, targets)
    np.testing.assert_allclose(logp, ref_logp, atol=TOL)
    np.testing.assert_allclose(ent, ref_ent, atol=TOL)


@pytest.mark.parametrize(
    "impl,b,t,d,v,chunk",
    [
        (token_logps, 2, 20, 16, 37, 8),  # V % chunk != 0: shifted, partially masked last chunk
        (token_logps, 2, 8, 16, 48, 16),  # V % chunk == 0
        (token_logps, 1, 7, 8, 23, 64),  # chunk >= V: single chunk
        (token_logps_remat, 2, 20, 16, 37, 8),  # autodiff (scan + checkpoint) path
    ],
)
def test_values_and_grads_match_naive(impl, b, t, d, v, chunk):
    hidden, lm_head, targets, cot = _inputs(b, t, d, v)
    got, ref = _both(hidden, lm_head, targets, cot, impl, (("chunk_size", chunk),), logps_only=chunk < v)
    assert len(got) == (7 if chunk < v else 4)
    assert got[0].shape == (b, t)
    _assert_match(got, ref)


def test_bf16_inputs_match_naive_on_same_bf16_inputs():
    hidden, lm_head, targets, cot = _inputs(2, 8, 16, 45, dtype=jnp.bfloat16)
    got, ref = _both(hidden, lm_head, targets, cot, token_logps, (("chunk_size", 16),))
    _assert_match(got[:2], ref[:2])  # values: same fp32-accumulated logits
    for g, r in zip(got[2:], ref[2:]):
        assert g.dtype == r.dtype == jnp.bfloat16
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        # Both are fp32 gradients rounded once to bf16: equal up to one bf16 ulp (2^-8 relative).
        assert np.all(np.abs(g - r) <= 2.0**-8 * np.abs(r) + TOL)


def test_compute_dtype_casts_first():
    hidden, lm_head, targets, _ = _inputs(2, 4, 16, 30)

    @jax.jit
    def run(h, w):
        f = lambda h: token_logps(h, w, targets, chunk_size=8, compute_dtype=jnp.bfloat16)  # noqa: E731
        bf = naive_token_logps(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets)
        return f(h), bf, naive_token_logps(h, w, targets), jax.grad(lambda h: jnp.sum(f(h)))(h)

    logp, ref, ref_fp32, g = run(hidden, lm_head)
    np.testing.assert_allclose(logp, ref, atol=TOL)
    assert not np.allclose(logp, ref_fp32, atol=1e-4)  # the bf16 cast did matter
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 1e-2


def test_logit_softcap():
    hidden, lm_head, targets, cot = _inputs(2, 5, 8, 27, scale=4.0)
    got, ref = _both(hidden, lm_head, targets, cot, token_logps, (("chunk_size", 8), ("logit_softcap", 5.0)))
    _assert_match(got, ref)
    uncapped = _numpy_ref(hidden, lm_head, targets)[0]
    assert not np.allclose(got[0], uncapped, atol=1e-3)  # the cap is active


def test_extreme_logits_finite_and_correct():
    # Logits of order 1e4: a naive exp would overflow; online max-shifting must keep everything finite.
    hidden, lm_head, targets, cot = _inputs(2, 6, 16, 41, scale=3e3)
    got, ref = _both(hidden, lm_head, targets, cot, token_logps, (("chunk_size", 8),))
    logp, ent = np.asarray(got[0]), np.asarray(got[1])
    assert all(np.all(np.isfinite(x)) for x in got)
    assert np.all(logp <= 0.0) and np.all(ent >= -TOL)
    # fp32 logits of size ~1e4 carry ~1e-3 absolute rounding; compare relative to that scale.
    ref_logp, ref_ent = _numpy_ref(hidden, lm_head, targets)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-2)
    for g, r in zip(got[2:], ref[2:]):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-2 * np.abs(np.asarray(r)).max())


def test_uniform_logits_closed_form():
    # lm_head = 0 -> uniform p: logp = -log V, entropy = log V, d sum(logp)/d lm_head = h^T (onehot - 1/V).
    v = 19
    hidden, _, targets, _ = _inputs(1, 3, 4, v)
    lm_head = jnp.zeros((4, v))

    @jax.jit
    def run(w):
        logp, ent = token_logps(hidden, w, targets, chunk_size=5, return_entropy=True)
        return logp, ent, jax.grad(lambda w: jnp.sum(token_logps(hidden, w, targets, chunk_size=5)))(w)

    logp, ent, g = run(lm_head)
    np.testing.assert_allclose(logp, -np.log(v) * np.ones((1, 3)), atol=TOL)
    np.testing.assert_allclose(ent, np.log(v) * np.ones((1, 3)), atol=TOL)
    expected = np.asarray(hidden[0]).T @ (np.eye(v)[np.asarray(targets[0])] - 1.0 / v)
    np.testing.assert_allclose(g, expected, atol=TOL)


def test_sharded_equals_unsharded():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
    hidden, lm_head, targets, cot = _inputs(4, 6, 8, 42)  # V % chunk != 0, V % tensor == 0

    def run(h, w, y):
        vals = token_logps(h, w, y, chunk_size=16, return_entropy=True)
        return vals + jax.grad(_loss(token_logps, cot, chunk_size=16), argnums=(0, 1))(h, w, y)

    ref = jax.jit(run)(hidden, lm_head, targets)  # single device
    sh = (
        NamedSharding(mesh, P("data", None, None)),
        NamedSharding(mesh, P(None, "tensor")),
        NamedSharding(mesh, P("data", None)),
    )
    args = [jax.device_put(x, s) for x, s in zip((hidden, lm_head, targets), sh)]
    got = jax.jit(run)(*args)
    assert len(ref[3].sharding.device_set) == 1 and len(got[3].sharding.device_set) == 8
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=TOL)
