"""Batched generation from a `Transformer` with a preallocated KV cache, compiled once per
(batch, prompt length, sampling settings).

Layout. B prompts [B, P], left-padded (mask 1 on real tokens). Each prompt is repeated G = num_generations
times, consecutively: output row r continues prompt r // G (TRL's GRPO layout). Prompt positions are
pos = clip(cumsum(mask) - 1, 0) and new token n (n = 0..N-1) sits at position sum(mask) + n, as in
transformers' `generate`. The cache has S = P + N slots: the prompt in [0, P), new token n in P + n.

Algorithm (one `jax.jit`):

    prefill:  model(prompt, mask, pos, cache) on the B prompts; last-slot hidden state h; cache and h
              repeated G x
    lax.while_loop, n = 0, 1, ... while n < N and some row is still running:
              logits = h @ lm_head; sample token n, record it,
              feed it at position sum(mask) + n (slot P + n) to get the next h

(The sampler thus appears once in the program; the decoder pass after the last token is unused, 1/N of
the decode work. The loop carries h [R, D], not logits [R, V].)

Decode step. With a few rows per step, a step costs about one read of every weight. On CPU (parameters on
CPU devices) the loop therefore runs `decode.decode_step` on transposed [out, in] copies of the weights made
once before the loop (`decode.decode_weights`, each the left operand of its product; the head a [V, D] copy)
and on keys cached as [R, K, E, S] (`decode.decode_cache`), see `decode` for why; elsewhere (or with
`TRANSPOSED_DECODE = False`) it runs the model's own cached forward. Both compute the same equations; logits
agree to fp32 rounding. The prefill always uses the model.

A row stops after emitting any id in `eos_ids` (that token is kept, mask 1); afterwards it gets `pad_id`,
mask 0 and log-probs 0. The loop exits as soon as every row has stopped (`num_steps` < N then).

Log-probs of each sampled token y: `logps` = log_softmax(z)[y] with z the processed logits (temperature,
top-k, top-p; see `processors`), the "sampling logprobs" vLLM and TRL report; `model_logps` =
log_softmax(logits)[y] of the raw model (temperature 1, unfiltered), which trainers need. Greedy decoding
(argmax of the raw logits; temperature/top-k/top-p ignored as in transformers) reports the model log-probs
in both. (TRL's GRPO recomputes "old" log-probs as log_softmax(logits / temperature) without top-k/top-p;
neither field is that quantity unless top_k = 0 and top_p = 1, where `logps` equals it.)

Sharding: with a mesh (given, or read from the parameters' `NamedSharding`), prompt rows, the cache and
the outputs are split over ('data', 'fsdp') (replicated where the row count is not divisible), cache heads
over 'tensor'; parameters stay in their own sharding. Sampling uses `fold_in(rng, n)` per step, so a seed
gives the same samples for the same shapes, sharded or not.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from align_jax.models.llama import KVCache, Transformer, init_cache
from align_jax.parallel.mesh import BATCH
from align_jax.sampling.decode import decode_cache, decode_step, decode_weights, head_logits
from align_jax.sampling.processors import sample_token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    """R = B * num_generations rows (prompt b -> rows b*G .. b*G + G - 1), N = max_new_tokens."""

    completion_ids: jax.Array  # [R, N] int32, pad_id after the stop token
    completion_mask: jax.Array  # [R, N] int32, 1 up to and including the stop token
    logps: jax.Array  # [R, N] float32, sampling log-probs (0 where mask is 0)
    model_logps: jax.Array  # [R, N] float32, raw-model log-probs (0 where mask is 0)
    prompt_ids: jax.Array  # [R, P] int32 (the prompts, repeated)
    prompt_mask: jax.Array  # [R, P] int32
    num_steps: jax.Array  # int32 scalar: tokens generated per row before the loop exited (<= N)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Generation settings. Only `static_key()` is part of the compile key: temperature, top-k/top-p values,
    stop ids and pad id are traced inputs, so changing them does not recompile."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    num_generations: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (use greedy=True), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def static_key(self) -> tuple:
        """(max_new_tokens, num_generations, greedy, top-k filter on, top-p filter on)."""
        return (self.max_new_tokens, self.num_generations, self.greedy, not self.greedy and self.top_k > 0,
                not self.greedy and self.top_p < 1.0)

    def knobs(self) -> dict:
        """The traced settings. Stop ids are padded with -1 (never sampled) to a multiple of 4 ids."""
        size = max(4, -(-len(self.eos_ids) // 4) * 4)
        eos = list(self.eos_ids) + [-1] * (size - len(self.eos_ids))
        return dict(temperature=jnp.asarray(self.temperature, jnp.float32), top_k=jnp.asarray(self.top_k, jnp.int32),
                    top_p=jnp.asarray(self.top_p, jnp.float32), eos_ids=jnp.asarray(eos, jnp.int32),
                    pad_id=jnp.asarray(self.pad_id, jnp.int32))


# ------------------------------------------------------------------------------------------------ sharding


def mesh_of(state) -> jax.sharding.Mesh | None:
    """The mesh of the first multi-device `NamedSharding` among the arrays of `state`, else None."""
    for x in jax.tree.leaves(state):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def _spec(mesh, shape, axes) -> P:
    """'batch' -> ('data', 'fsdp'), 'kv_heads' -> 'tensor' (only the mesh axes of size > 1, and only when they
    divide the dimension; otherwise replicated, silently: e.g. B prompts before the G-fold repeat)."""
    out = []
    for n, a in zip(shape, axes):
        names = BATCH if a == "batch" else ("tensor",) if a == "kv_heads" else ()
        names = tuple(x for x in names if mesh.shape[x] > 1)
        if not names or n % math.prod(mesh.shape[x] for x in names):
            out.append(None)
        else:
            out.append(names if len(names) > 1 else names[0])
    return P(*out)


def _constrain(x, mesh, axes):
    if mesh is None:
        return x
    return lax.with_sharding_constraint(x, NamedSharding(mesh, _spec(mesh, x.shape, axes)))


def _constrain_cache(cache: KVCache, mesh) -> KVCache:
    def f(x):
        return _constrain(x, mesh, ("batch", "kv_heads", None, None)[: x.ndim])

    return cache.map_batch(f)


# ------------------------------------------------------------------------------------------------ core


def _last_logits(model: Transformer, h_BxD):
    """Logits [B, V] fp32 of final hidden states, exactly as `Transformer.__call__` computes them."""
    return jnp.einsum("bd,dv->bv", h_BxD, model.lm_head_DxV(), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "static", "mesh", "transposed"))
def _generate_jit(graphdef, state, prompt_ids_BxP, prompt_mask_BxP, rng, knobs, *, static, mesh, transposed=False):
    model = nnx.merge(graphdef, state)
    B, Pl = prompt_ids_BxP.shape
    N, G, greedy, filter_top_k, filter_top_p = static
    pad_id = knobs["pad_id"]
    R = B * G
    ids_BxP = _constrain(prompt_ids_BxP.astype(jnp.int32), mesh, ("batch", None))
    mask_BxP = _constrain(prompt_mask_BxP.astype(jnp.int32), mesh, ("batch", None))
    pos_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)

    cache = _constrain_cache(init_cache(model.config, B, Pl + N), mesh)
    h_BxPxD, cache = model(ids_BxP, mask_BxP, pos_BxP, cache=cache, return_hidden=True)

    def rep(x):
        return jnp.repeat(x, G, axis=0) if G > 1 else x

    cache = _constrain_cache(cache.map_batch(rep), mesh)
    h_RxD = _constrain(rep(h_BxPxD[:, -1]), mesh, ("batch", None))
    len_R = rep(jnp.sum(mask_BxP, axis=1))
    stop_E = knobs["eos_ids"]

    def is_stop(t_R):
        return jnp.any(t_R[:, None] == stop_E[None, :], axis=1)

    sample = functools.partial(sample_token, greedy=greedy, temperature=knobs["temperature"],
                               top_k=knobs["top_k"], top_p=knobs["top_p"], filter_top_k=filter_top_k,
                               filter_top_p=filter_top_p)

    def out_buffers():
        z = lambda dt, v=0: _constrain(jnp.full((R, N), v, dt), mesh, ("batch", None))  # noqa: E731
        return z(jnp.int32, pad_id), z(jnp.int32), z(jnp.float32), z(jnp.float32)

    def write(bufs, n, tok_R, alive_R, lp_R, mlp_R):
        vals = (jnp.where(alive_R, tok_R, pad_id), alive_R.astype(jnp.int32),
                jnp.where(alive_R, lp_R, 0.0), jnp.where(alive_R, mlp_R, 0.0))
        return tuple(lax.dynamic_update_slice(b, v[:, None].astype(b.dtype), (0, n)) for b, v in zip(bufs, vals))

    def cond(carry):
        n, _, _, done_R, _ = carry
        return (n < N) & ~jnp.all(done_R)

    w = None
    if transposed:  # before the loop: one transposed copy of the weights and of the keys per call
        w, cache = decode_weights(model), _constrain_cache(decode_cache(cache), mesh)

    def body(carry):
        n, cache, h_RxD, done_R, bufs = carry
        m = nnx.merge(graphdef, state)
        logits_RxV = head_logits(w, h_RxD) if transposed else _last_logits(m, h_RxD)
        tok_R, lp_R, mlp_R = sample(logits_RxV, jax.random.fold_in(rng, n))
        alive_R = ~done_R
        tok_R = jnp.where(alive_R, tok_R, pad_id)
        bufs = write(bufs, n, tok_R, alive_R, lp_R, mlp_R)
        done_R = done_R | (alive_R & is_stop(tok_R))
        if transposed:
            h_RxD, cache = decode_step(m, w, tok_R, len_R + n, cache)
        else:
            h_Rx1xD, cache = m(tok_R[:, None], None, (len_R + n)[:, None], cache=cache, return_hidden=True)
            h_RxD = h_Rx1xD[:, 0]
        h_RxD = _constrain(h_RxD, mesh, ("batch", None))
        return n + 1, _constrain_cache(cache, mesh), h_RxD, done_R, bufs

    carry = (jnp.asarray(0, jnp.int32), cache, h_RxD, jnp.zeros((R,), bool), out_buffers())
    n, _, _, _, (ids_RxN, mask_RxN, lp_RxN, mlp_RxN) = lax.while_loop(cond, body, carry)
    return SampleOutput(ids_RxN, mask_RxN, lp_RxN, mlp_RxN, rep(ids_BxP), rep(mask_BxP), n)


# ------------------------------------------------------------------------------------------------ API


TRANSPOSED_DECODE: bool | None = None  # None: on CPU only (see `decode`); False runs the model's cached forward


def _transposed_decode(state) -> bool:
    if TRANSPOSED_DECODE is not None:
        return TRANSPOSED_DECODE
    leaf = jax.tree.leaves(state)[0]
    try:
        platforms = {d.platform for d in leaf.devices()}
    except Exception:  # a tracer: the sampler called under a transformation
        platforms = {jax.default_backend()}
    return platforms == {"cpu"}


def _as_key(rng):
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def default_eos_ids(model: Transformer) -> tuple[int, ...]:
    """`eos_token_id` (int or list) of the model's config.json, or () when it has none."""
    eos = (model.config.hf_config or {}).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


class Sampler:
    """Generation settings plus prompt-length bucketing: prompts are left-padded to a multiple of
    `prompt_bucket` (invisible to the model: padded slots are masked and positions come from the mask), so
    that prompt lengths share compiled programs; `jax.jit` keeps one per (batch, bucket, settings).

        sampler = Sampler(max_new_tokens=128, temperature=0.9, top_p=0.95, eos_ids=(2,), num_generations=8)
        out = sampler(model, prompt_ids_BxP, prompt_mask_BxP, rng=jax.random.key(0))

    Several processes (the same call on each, with the same `rng`): either each process's own prompt rows as
    global arrays (e.g. `parallel.to_device`, split over the batch axes) -- the outputs are then global arrays
    split the same way (read a process's rows from its addressable shards: `rl.rollout.local_rows`) -- or the
    same host (numpy) prompts on every process, and every process gets the whole output (replicated).
    """

    def __init__(self, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, eos_ids=(), pad_id: int = 0, num_generations: int = 1,
                 prompt_bucket: int = 1, mesh=None):
        eos_ids = (eos_ids,) if isinstance(eos_ids, (int, np.integer)) else tuple(int(e) for e in eos_ids)
        self.params = SamplingParams(int(max_new_tokens), float(temperature), int(top_k), float(top_p),
                                     bool(greedy), eos_ids, int(pad_id), int(num_generations))
        if prompt_bucket < 1:
            raise ValueError(f"prompt_bucket must be >= 1, got {prompt_bucket}")
        self.prompt_bucket = int(prompt_bucket)
        self.mesh = mesh

    def __call__(self, model: Transformer, prompt_ids_BxP, prompt_mask_BxP, rng=None) -> SampleOutput:
        host = not isinstance(prompt_ids_BxP, jax.Array)
        ids, mask = jnp.asarray(prompt_ids_BxP, jnp.int32), jnp.asarray(prompt_mask_BxP, jnp.int32)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must both be [B, P]")
        if not self.params.greedy and rng is None:
            raise ValueError("sampling needs `rng` (a jax PRNG key or an int seed); greedy does not")
        B, Pl = ids.shape
        extra = -Pl % self.prompt_bucket
        if extra:
            ids = jnp.pad(ids, ((0, 0), (extra, 0)), constant_values=self.params.pad_id)
            mask = jnp.pad(mask, ((0, 0), (extra, 0)))
        graphdef, state = nnx.split(model)
        mesh = self.mesh if self.mesh is not None else mesh_of(state)
        if mesh is not None:
            sh = NamedSharding(mesh, _spec(mesh, ids.shape, ("batch", None)))
            ids, mask = (x if x.sharding.is_equivalent_to(sh, x.ndim) else jax.device_put(x, sh) for x in (ids, mask))
        out = _generate_jit(graphdef, state, ids, mask, _as_key(rng), self.params.knobs(),
                            static=self.params.static_key(), mesh=mesh, transposed=_transposed_decode(state))
        if host and mesh is not None and jax.process_count() > 1:  # the same prompts on every process
            out = _replicated(out, mesh=mesh)
        if extra:
            out = dataclasses.replace(out, prompt_ids=out.prompt_ids[:, extra:], prompt_mask=out.prompt_mask[:, extra:])
        return out


@functools.partial(jax.jit, static_argnames=("mesh",))
def _replicated(out: SampleOutput, *, mesh) -> SampleOutput:
    """`out` with every array whole on every device (readable with `np.asarray` on every process)."""
    return lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


def generate(model: Transformer, prompt_ids_BxP, prompt_mask_BxP, *, max_new_tokens: int, rng=None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_ids=None, pad_id: int = 0, num_generations: int = 1, prompt_bucket: int = 1,
             mesh=None) -> SampleOutput:
    """Samples `num_generations` completions of up to `max_new_tokens` tokens per left-padded prompt.

    Args:
      model: a `Transformer` (parameters in any sharding).
      prompt_ids_BxP, prompt_mask_BxP: left-padded prompts and their mask (1 = real token).
      rng: jax PRNG key or int seed (ignored when greedy).
      temperature, top_k (0 = off), top_p (1 = off): see `align_jax.sampling.processors`.
      greedy: argmax decoding (transformers' do_sample=False).
      eos_ids: stop ids (int or sequence); None = config.json's `eos_token_id`; () = never stop.
      pad_id: filler after a row stops (and for bucket padding).
      num_generations: G samples per prompt, consecutive rows.
      prompt_bucket: left-pad P to a multiple of this (fewer recompiles).
      mesh: defaults to the parameters' mesh.
    Returns a `SampleOutput` with R = B * G rows.
    """
    if eos_ids is None:
        eos_ids = default_eos_ids(model)
    return Sampler(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   greedy=greedy, eos_ids=eos_ids, pad_id=pad_id, num_generations=num_generations,
                   prompt_bucket=prompt_bucket, mesh=mesh)(model, prompt_ids_BxP, prompt_mask_BxP, rng)
