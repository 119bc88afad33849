"""KV-cache sampler: greedy parity with transformers' generate (tests/fixtures/hf/*/greedy.npz), cache logits
and the sampler's transposed-weight decode step vs the full forward, top-k/top-p sets and log-probs vs a numpy
re-implementation of transformers' warpers, stop ids / padding / early exit, num_generations layout, seeds, and
sharded == single device."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from align_jax.models import load_pretrained
from align_jax.models.llama import init_cache
from align_jax.parallel import make_mesh
from align_jax.sampling import Sampler, generate, process_logits
from align_jax.sampling.decode import decode_cache, decode_step, decode_weights, head_logits

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
N_NEW = 8
G_STAT = 256  # samples per prompt in the sampling tests
SAMPLING = dict(temperature=0.5, top_k=20, top_p=0.8)


def _greedy(name):
    return dict(np.load(os.path.join(HF, name, "greedy.npz")))


@functools.lru_cache(maxsize=None)
def _model(name, mesh_shape=None):
    return load_pretrained(os.path.join(HF, name), mesh=make_mesh(*mesh_shape) if mesh_shape else None)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ref_process(logits_NxV, temperature, top_k, top_p):
    """transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper, in numpy."""
    z = (logits_NxV / temperature).astype(np.float32)
    if top_k > 0:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    if top_p < 1.0:
        order = np.argsort(z, axis=-1, kind="stable")
        srt = np.take_along_axis(z, order, -1)
        e = np.exp(srt - srt[:, -1:])
        cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
        remove_sorted = cum <= 1 - top_p
        remove_sorted[:, -1] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, -1)
        z = np.where(remove, -np.inf, z)
    return z


def _full_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Next-token logits [R, N, V] of a plain full forward over [prompt, completion]."""
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    logits = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask)
    Pl = prompt_ids.shape[1]
    return np.asarray(logits[:, Pl - 1:-1])


GREEDY_MODELS = ["llama", "llama3_rope", "llama_linear_rope", "qwen2", "qwen3", "mistral", "tied", "sharded"]


@pytest.mark.parametrize("name", GREEDY_MODELS)
def test_greedy_matches_transformers_generate(name):
    """Every fixture architecture, rope-scaled Llama (llama3, linear) included: the tokens of transformers'
    `generate` with a stop id that row 1 emits early (then pad), row 0 running all steps."""
    g = _greedy(name)
    model = _model(name)
    Pl = g["prompt_ids"].shape[1]
    eos = int(g["eos_token_id"])
    run = functools.partial(generate, model, g["prompt_ids"], g["prompt_attention_mask"], max_new_tokens=N_NEW,
                            greedy=True, pad_id=0)
    out = run(eos_ids=eos)
    ids, mask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    np.testing.assert_array_equal(ids, g["output_ids"][:, Pl:])
    # Mask: 1 up to and including the eos; row 1 stops early, row 0 runs all steps.
    stop = [N_NEW, int(np.argmax(g["output_ids"][1, Pl:] == eos)) + 1]
    assert stop[1] < N_NEW and ids[1, stop[1] - 1] == eos
    np.testing.assert_array_equal(mask, np.arange(N_NEW)[None] < np.asarray(stop)[:, None])
    assert int(out.num_steps) == N_NEW
    # Log-probs of the chosen tokens = log_softmax of transformers' per-step logits (unfinished rows).
    hf_logp = np.take_along_axis(_log_softmax(g["logits"].transpose(1, 0, 2)), ids[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.model_logps)[mask == 1], hf_logp[mask == 1], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.logps), np.asarray(out.model_logps))
    assert (np.asarray(out.logps)[mask == 0] == 0).all()
    np.testing.assert_array_equal(np.asarray(out.prompt_ids), g["prompt_ids"])
    if name != "llama":
        return
    # No stop id: transformers' pilot run (same compiled program: stop ids are a traced input).
    out = run(eos_ids=())
    np.testing.assert_array_equal(np.asarray(out.completion_ids), g["pilot_output_ids_no_eos"][:, Pl:])
    assert np.asarray(out.completion_mask).all()
    # Several stop ids, other pad id: row 0 stops at its 3rd token (40), row 1 at its 4th (227), and the
    # while loop exits after 4 steps instead of 8.
    out = run(eos_ids=(eos, 40), pad_id=7)
    ids = np.asarray(out.completion_ids)
    np.testing.assert_array_equal(ids[0], [8, 21, 40] + [7] * 5)
    np.testing.assert_array_equal(ids[1], [237, 237, 237, 227] + [7] * 4)
    np.testing.assert_array_equal(np.asarray(out.completion_mask).sum(1), [3, 4])
    assert int(out.num_steps) == 4


def test_cache_logits_equal_full_forward():
    """Prefill + one-token cached steps give the full forward's logits at every step (qwen3: q/k norm,
    head_dim != hidden / heads, GQA), including a left-padded row."""
    model = _model("qwen3")
    inputs = np.load(os.path.join(HF, "qwen3", "inputs.npz"))
    prompt, pmask = inputs["input_ids_left"][:, :8], inputs["attention_mask_left"][:, :8]
    pmask[2, :] = np.array([0, 0, 0, 0, 0, 0, 1, 1])  # a row with only 2 real prompt tokens
    new = np.random.default_rng(0).integers(1, 256, (3, 5)).astype(np.int32)

    @nnx.jit
    def cached(m, prompt, pmask, new):
        cache = init_cache(m.config, 3, 8 + 5)
        pos = jnp.maximum(jnp.cumsum(pmask, 1) - 1, 0)
        logits, cache = m(prompt, pmask, pos, cache=cache)
        first = logits[:, -1]

        def step(cache, x):
            tok, n = x
            out, cache = m(tok[:, None], None, (jnp.sum(pmask, 1) + n)[:, None], cache=cache)
            return cache, out[:, 0]

        cache, rest = jax.lax.scan(step, cache, (new.T, jnp.arange(5)))
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], 1), logits, cache.end

    steps, prefill, end = cached(model, prompt, pmask, new)
    assert int(end) == 13
    full = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(
        model, jnp.concatenate([prompt, new], 1), jnp.concatenate([pmask, np.ones_like(new)], 1))
    full = np.asarray(full)
    np.testing.assert_allclose(np.asarray(steps), full[:, 7:], atol=1e-5)
    real = pmask.astype(bool)
    np.testing.assert_allclose(np.asarray(prefill)[real], full[:, :8][real], atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3", "tied"])
def test_transposed_decode_step_equals_full_forward(name):
    """The sampler's decode step (`decode_weights` + `decode_step`, transposed weight copies) gives the full
    forward's logits: qwen3 (q/k norm, head_dim != hidden / heads, GQA) and tied embeddings (head = embed)."""
    model = _model(name)
    rng = np.random.default_rng(1)
    V = model.config.vocab_size
    prompt = rng.integers(1, V, (3, 6)).astype(np.int32)
    pmask = np.ones_like(prompt)
    pmask[1, :3] = 0  # left padding
    new = rng.integers(1, V, (3, 4)).astype(np.int32)

    @nnx.jit
    def decoded(m, prompt, pmask, new):
        cache = init_cache(m.config, 3, 6 + 4)
        _, cache = m(prompt, pmask, jnp.maximum(jnp.cumsum(pmask, 1) - 1, 0), cache=cache)
        w, cache = decode_weights(m), decode_cache(cache)

        def step(cache, x):
            tok, n = x
            h, cache = decode_step(m, w, tok, jnp.sum(pmask, 1) + n, cache)
            return cache, head_logits(w, h)

        cache, logits = jax.lax.scan(step, cache, (new.T, jnp.arange(4)))
        return jnp.swapaxes(logits, 0, 1), cache.end, cache.valid_BxS

    logits, end, valid = decoded(model, prompt, pmask, new)
    full = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(
        model, jnp.concatenate([prompt, new], 1), jnp.concatenate([pmask, np.ones_like(new)], 1))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, 6:], atol=1e-5)
    assert int(end) == 10
    np.testing.assert_array_equal(np.asarray(valid), np.concatenate([pmask, np.ones_like(new)], 1).astype(bool))


@functools.lru_cache(maxsize=None)
def _sampled(seed, mesh_shape=None, **kw):
    g = _greedy("llama")
    params = dict(SAMPLING, **dict(kw))
    return generate(_model("llama", mesh_shape), g["prompt_ids"], g["prompt_attention_mask"], max_new_tokens=N_NEW,
                    rng=jax.random.key(seed), eos_ids=int(g["eos_token_id"]), num_generations=G_STAT, **params)


def test_top_k_1_equals_greedy_and_generation_layout():
    g = _greedy("llama")
    # Same compiled program as the sampling tests (top-k and top-p filters on; their values are traced).
    out = _sampled(3, top_k=1, top_p=0.99, temperature=1.3)
    Pl = g["prompt_ids"].shape[1]
    rows = np.repeat(np.arange(2), G_STAT)  # row r continues prompt r // G
    np.testing.assert_array_equal(np.asarray(out.completion_ids), g["output_ids"][rows, Pl:])
    np.testing.assert_array_equal(np.asarray(out.prompt_ids), g["prompt_ids"][rows])
    np.testing.assert_array_equal(np.asarray(out.prompt_mask), g["prompt_attention_mask"][rows])
    np.testing.assert_array_equal(np.asarray(out.logps), 0.0)  # a one-token distribution
    greedy = generate(_model("llama"), g["prompt_ids"], g["prompt_attention_mask"], max_new_tokens=N_NEW,
                      greedy=True, eos_ids=int(g["eos_token_id"]))
    # 512 rows vs 2: XLA's CPU kernels sum in a row-count-dependent order (a few fp32 ulps of a log-prob ~3).
    np.testing.assert_allclose(np.asarray(out.model_logps), np.asarray(greedy.model_logps)[rows], atol=1e-5)


def test_top_k_top_p_sets_logps_and_distribution():
    """Every sampled token lies in transformers' top-k/top-p set of the full-forward logits; `logps` and
    `model_logps` are log_softmax of the processed / raw logits at that token; the first-token frequencies
    fit the processed distribution (and not the untempered one)."""
    from scipy import stats

    out = _sampled(0)
    ids, mask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    logits = _full_logits(_model("llama"), out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask)
    real = mask == 1
    raw = logits[real]  # [M, V] at every generated (unmasked) token
    tok = ids[real]
    z = _ref_process(raw, **SAMPLING)
    allowed = np.isfinite(z)
    sizes = allowed.sum(-1)
    assert sizes.min() >= 1 and sizes.max() < 20 and sizes.mean() > 2  # the filters bite, not trivially
    assert allowed[np.arange(len(tok)), tok].all()
    np.testing.assert_allclose(np.asarray(out.logps)[real], np.take_along_axis(_log_softmax(z), tok[:, None], -1)[:, 0],
                               atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.model_logps)[real],
                               np.take_along_axis(_log_softmax(raw), tok[:, None], -1)[:, 0], atol=2e-5)
    assert (ids[~real] == 0).all() and (np.asarray(out.logps)[~real] == 0).all()
    assert mask[:, 0].all() and (np.diff(mask, axis=1) <= 0).all()  # 1 up to the stop, then 0
    # First token of each prompt over its G_STAT samples: chi-square against softmax(z) (bins with expected
    # count < 5 merged); the same counts reject temperature 1 with the same filters.
    def pvalue(counts, zz):
        p = np.exp(_log_softmax(zz[None].astype(np.float64)))[0]
        if counts[p == 0].any():
            return 0.0
        big = p * G_STAT >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(p[big], p[~big].sum()) * G_STAT
        return stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue

    for b in range(2):
        counts = np.bincount(ids[b * G_STAT:(b + 1) * G_STAT, 0], minlength=raw.shape[-1])
        first = logits[b * G_STAT, 0][None]
        assert (counts > 0).sum() > 3
        assert pvalue(counts, _ref_process(first, **SAMPLING)[0]) > 1e-3
        assert pvalue(counts, _ref_process(first, 1.0, 20, 0.8)[0]) < 1e-3


def test_seeds_reproducible():
    a, b, c = _sampled(0), _sampled(0, temperature=0.5), _sampled(1)  # b: a second call, same settings
    assert a is not b
    for f in ("completion_ids", "completion_mask", "logps", "model_logps"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    assert (np.asarray(a.completion_ids) != np.asarray(c.completion_ids)).mean() > 0.3


def test_process_logits_matches_transformers_warpers():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 50)) * 2).astype(np.float32)
    f = jax.jit(lambda x, t, k, p: process_logits(x, t, k, p, filter_top_k=True, filter_top_p=True))
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.5), (1.3, 10, 0.9), (0.5, 1, 0.3), (1.0, 50, 0.999)]:
        got = np.asarray(f(logits, t, k, p))
        ref = _ref_process(logits, t, k, p)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref), err_msg=str((t, k, p)))
        np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)
    # Ties, +-0, a huge range (probabilities that underflow to 0), p = 1 with the filter compiled in: top-k as
    # transformers; top-p keeps every token tied at the threshold (sorted rule: threshold = value at the first
    # kept sorted position).
    tied = np.round(logits * 2) / 2
    tied[0, :4] = [0.0, -0.0, 0.0, -0.0]
    tied[1, :3] = [-300.0, 250.0, -1e30]
    for t, k, p in [(1.0, 7, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (0.8, 12, 0.85), (1.0, 0, 0.05), (1.0, 9, 1.0)]:
        got = np.asarray(f(tied, t, k, p))
        ref = _ref_process(tied, t, k, 1.0)
        if p < 1.0:
            asc = np.sort(ref, axis=-1)
            e = np.exp(asc - asc[:, -1:])
            cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
            n_drop = np.minimum((cum <= 1 - p).sum(-1), ref.shape[-1] - 1)
            ref = np.where(ref < asc[np.arange(len(asc)), n_drop][:, None], -np.inf, ref)
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref), err_msg=str((t, k, p)))
        np.testing.assert_array_equal(got[np.isfinite(got)], ref[np.isfinite(ref)])
    # Python values that turn the filters off leave them out (no threshold search in the program).
    assert "while" not in jax.jit(lambda x: process_logits(x, 0.7, 0, 1.0)).lower(logits).as_text()


def test_sharded_equals_single_device():
    """Mesh (data 2, fsdp 2, tensor 2) on 8 CPU devices: greedy (with prompt bucketing) equals transformers /
    the single-device run, and sampling with the same seed gives the same tokens."""
    g = _greedy("llama")
    Pl = g["prompt_ids"].shape[1]
    shape = (2, 2, 2)
    model = _model("llama", shape)
    assert model.layers[0].attn.q[...].sharding.spec == P("fsdp", "tensor", None)
    sampler = Sampler(max_new_tokens=N_NEW, greedy=True, eos_ids=[int(g["eos_token_id"])], num_generations=4,
                      prompt_bucket=8)
    out = sampler(model, g["prompt_ids"], g["prompt_attention_mask"])
    rows = np.repeat(np.arange(2), 4)
    assert out.completion_ids.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out.completion_ids), g["output_ids"][rows, Pl:])
    np.testing.assert_array_equal(np.asarray(out.prompt_ids), g["prompt_ids"][rows])  # bucket padding removed
    single = generate(_model("llama"), g["prompt_ids"], g["prompt_attention_mask"], max_new_tokens=N_NEW,
                      greedy=True, eos_ids=int(g["eos_token_id"]))
    np.testing.assert_allclose(np.asarray(out.model_logps), np.asarray(single.model_logps)[rows], atol=1e-5)
    sharded, ref = _sampled(0, shape), _sampled(0)
    np.testing.assert_array_equal(np.asarray(sharded.completion_ids), np.asarray(ref.completion_ids))
    np.testing.assert_allclose(np.asarray(sharded.logps), np.asarray(ref.logps), atol=1e-5)
