"""Log-probabilities of a model's completions, the one set of helpers the policy, the reference, the rollouts and
evaluation all use. Every helper runs the decoder for hidden states and the vocabulary-chunked op
`align_jax.ops.token_logps` for log π(y_t | y_<t, x), so [B, T, V] logits are never materialised.

Two layouts:
- right-padded rows (SFT / preference data): `completion_token_logps`, `pair_token_logps`, `seq_logps`;
- left-padded prompt of P tokens + N completion slots (online rollouts): `completion_logps`, `completion_logps_jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.ops import token_logps


def next_token_mask(attention_mask_BxT, completion_mask_BxT):
    """[B, T-1] float mask of the predicted tokens 1..T-1 that count: real completion tokens."""
    return completion_mask_BxT[:, 1:].astype(jnp.float32) * attention_mask_BxT[:, 1:].astype(jnp.float32)


def completion_token_logps(model, input_ids_BxT, attention_mask_BxT, completion_mask_BxT, *, chunk_size: int,
                           positions_BxT=None, segment_ids_BxT=None):
    """Per-token log-probs log π(y_t | y_<t, x) of tokens 1..T-1 and their loss mask, both [B, T-1].

    The mask is `completion_mask[:, 1:]` (a token counts when it is a completion token), and, for packed rows,
    0 where token t+1 starts a new segment (it is not predicted from its own example)."""
    h_BxTxD = model(input_ids_BxT, attention_mask_BxT, positions_BxT, segment_ids_BxT, return_hidden=True)
    logps = token_logps(h_BxTxD[:, :-1], model.lm_head_DxV(), input_ids_BxT[:, 1:], chunk_size=chunk_size)
    mask = next_token_mask(attention_mask_BxT, completion_mask_BxT)
    if segment_ids_BxT is not None:
        mask = mask * (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1])
    return logps, mask


def unpack(x_RxL, index):
    """`x` [R, L, ...] (a value at every place of packed rows) at the flat places `index` [N, ...] (row·L + column
    within the rows of the sequence's process: `align_jax.data.packing`): [N, ..., ...]. With several processes
    the global rows and sequences are the processes' blocks in process order, so sequence n's rows start at
    block n // (N / P) of the rows."""
    R, L = x_RxL.shape[:2]
    N, P = index.shape[0], jax.process_count()
    if P > 1:
        owner = jnp.arange(N, dtype=index.dtype) // (N // P)
        index = index + (owner * (R // P) * L).reshape((N,) + (1,) * (index.ndim - 1))
    return x_RxL.reshape((R * L,) + x_RxL.shape[2:])[index]


def is_packed(batch) -> bool:
    return "packed_input_ids" in batch


def packed_token_logps(model, batch, chunk_size: int, return_entropy: bool = False):
    """log π(token c+1 | its segment up to c) at every place (r, c) of the packed rows, [R, L] (last column 0;
    and the entropies when `return_entropy`)."""
    ids, seg = batch["packed_input_ids"], batch["packed_segment_ids"]
    h_RxLxD = model(ids, (seg > 0).astype(jnp.int32), batch["packed_positions"], seg, return_hidden=True)
    out = token_logps(h_RxLxD[:, :-1], model.lm_head_DxV(), ids[:, 1:], chunk_size=chunk_size,
                      return_entropy=return_entropy)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1)))  # noqa: E731
    return tuple(map(pad, out)) if return_entropy else pad(out)


def unpacked_token_logps(logps_RxL, token_index_NxL, attention_mask_NxL, completion_mask_NxL):
    """The padded layout of packed log-probs: (logps, mask) [N, L-1] as `completion_token_logps` gives them for
    right-padded rows of length L (token t+1 of a sequence is predicted at its token t's place)."""
    return unpack(logps_RxL, token_index_NxL)[:, :-1], next_token_mask(attention_mask_NxL, completion_mask_NxL)


def last_token_places(token_index_NxL, attention_mask_NxL):
    """The packed place of each sequence's last token ([N])."""
    last = jnp.maximum(attention_mask_NxL.sum(-1) - 1, 0)
    return jnp.take_along_axis(token_index_NxL, last[:, None].astype(jnp.int32), axis=1)[:, 0]


def pair_token_logps(model, batch, chunk_size):
    """Chosen and rejected in one concatenated forward: returns (chosen, rejected) x (logps, mask) [B, T-1]. A
    packed batch (`align_jax.data.packing`): one forward over its rows, the same values in the padded layout."""
    if is_packed(batch):
        lp = packed_token_logps(model, batch, chunk_size)
        return tuple(unpacked_token_logps(lp, batch[f"{s}_token_index"], batch[f"{s}_attention_mask"],
                                          batch[f"{s}_completion_mask"]) for s in ("chosen", "rejected"))
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    comp = jnp.concatenate([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    logps, mask = completion_token_logps(model, ids, attn, comp, chunk_size=chunk_size)
    B = batch["chosen_input_ids"].shape[0]
    return (logps[:B], mask[:B]), (logps[B:], mask[B:])


def group_token_logps(model, batch, chunk_size: int, return_entropy: bool):
    """Groupwise batch [B, K, L] (padded or packed) -> per-token log-probs (and entropies) of tokens 1..L-1 and
    the loss mask, [B·K, L-1] (rows of padded group slots are masked)."""
    B, K, L = batch["attention_mask"].shape
    attn, comp = (batch[k].reshape(B * K, L) for k in ("attention_mask", "completion_mask"))
    if is_packed(batch):
        index = batch["token_index"].reshape(B * K, L)
        packed = packed_token_logps(model, batch, chunk_size, return_entropy)
        out = tuple(unpack(x, index)[:, :-1] for x in packed) if return_entropy else unpack(packed, index)[:, :-1]
    else:
        ids = batch["input_ids"].reshape(B * K, L)
        h = model(ids, attn, None, None, return_hidden=True)
        out = token_logps(h[:, :-1], model.lm_head_DxV(), ids[:, 1:], chunk_size=chunk_size,
                          return_entropy=return_entropy)
    mask = next_token_mask(attn, comp)
    valid = (batch["group_mask"] * batch["example_weight"][:, None]).reshape(B * K).astype(jnp.float32)
    return out, mask * valid[:, None]


def seq_logps(logps, mask):
    """Sequence log-probability Σ_t mask_t · log π(y_t | ...)  ([B, T] -> [B])."""
    return jnp.sum(logps * mask, axis=-1)


def completion_logps(model, input_ids_RxT, attention_mask_RxT, num_completion_tokens: int, *, temperature=1.0,
                     chunk_size: int = 8192, return_entropy: bool = False):
    """log_softmax(logits / T)[y] of the last N tokens of each row ([R, N]; rows = left-padded prompt of P
    tokens followed by N completion slots), and their entropies when `return_entropy`. Positions are
    cumsum(attention_mask) − 1 (clipped at 0), as in the sampler. Only the N completion positions go through
    the LM head (TRL's `logits_to_keep`)."""
    N = num_completion_tokens
    h_RxTxD = model(input_ids_RxT, attention_mask_RxT, return_hidden=True)  # positions: cumsum(mask) - 1
    return tempered_logps(model, h_RxTxD[:, -N - 1:-1], input_ids_RxT[:, -N:], temperature, chunk_size,
                          return_entropy=return_entropy)


def tempered_logps(model, h_RxNxD, ids_RxN, temperature: float, chunk_size: int, return_entropy: bool = False):
    """log_softmax(logits / T)[y] (TRL: logits /= temperature) from hidden states: (h / T) W = logits / T."""
    if temperature != 1.0:
        h_RxNxD = h_RxNxD / jnp.asarray(temperature, h_RxNxD.dtype)
    return token_logps(h_RxNxD, model.lm_head_DxV(), ids_RxN, chunk_size=chunk_size, return_entropy=return_entropy)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_completion_tokens", "temperature", "chunk_size"))
def completion_logps_jit(graphdef, params, rest, ids, attn, *, num_completion_tokens, temperature, chunk_size):
    """`completion_logps` of nnx.merge(graphdef, params, rest) (π_old and π_ref in a rollout); module-level so
    the compiled program is shared by every run of the process."""
    return completion_logps(nnx.merge(graphdef, params, rest), ids, attn, num_completion_tokens,
                            temperature=temperature, chunk_size=chunk_size)
