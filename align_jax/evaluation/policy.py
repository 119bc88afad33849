"""Policy evaluation used by the experiments (and the toy task's SFT-vs-aligned tables).

- `generate_completions`: prompts (chat messages or strings) -> greedy completions (text), batched through the
  KV-cache sampler; prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`).
- `preference_accuracy`: on held-out pairs, the fraction where the policy's sequence log-likelihood of the
  chosen completion exceeds the rejected one's (log π(y_w|x) > log π(y_l|x)), and — given a reference — the
  DPO implicit-reward accuracy (β-free: log π/π_ref of chosen > of rejected).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from align_jax.data.tokenize import tokenize_chat, tokenize_text
from align_jax.models.logps import pair_token_logps, seq_logps
from align_jax.sampling import Sampler


def prompt_ids(tokenizer, prompt) -> list[int]:
    """As the trainers tokenize a prompt: text with the tokenizer's special tokens (e.g. BOS), a conversation
    through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return tokenize_text(tokenizer, prompt)
    return tokenize_chat(tokenizer, prompt, add_generation_prompt=True)


def generate_completions(model, tokenizer, prompts, *, batch_size: int = 64, max_new_tokens: int = 32,
                         greedy: bool = True, temperature: float = 1.0, seed: int = 0,
                         max_prompt_length: int | None = None) -> list[str]:
    """Completions (decoded without special tokens) for `prompts`, in order; a prompt longer than
    `max_prompt_length` tokens keeps its last ones."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    if max_prompt_length:
        ids = [x[-max_prompt_length:] for x in ids]
    P = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    sampler = Sampler(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                      eos_ids=(eos,) if eos is not None else (), pad_id=pad)
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)  # fixed batch shape: one compile
        arr = np.full((batch_size, P), pad, np.int32)
        mask = np.zeros((batch_size, P), np.int32)
        for i, x in enumerate(chunk):
            arr[i, P - len(x):], mask[i, P - len(x):] = x, 1
        res = sampler(model, arr, mask, rng=jax.random.key(seed + start))
        comp, cmask = np.asarray(res.completion_ids), np.asarray(res.completion_mask)
        for i in range(n):
            toks = [int(t) for t, m in zip(comp[i], cmask[i]) if m and t != eos]
            out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


def _sequence_logps_fn(model, chunk_size: int):
    """A jitted (state, pair batch) -> (chosen, rejected) sequence log-probs for `model`, and its state."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, batch):
        (c, cm), (r, rm) = pair_token_logps(nnx.merge(graphdef, state), batch, chunk_size)
        return seq_logps(c, cm), seq_logps(r, rm)

    return fn, state


def pair_sequence_logps(model, loader, *, chunk_size: int = 8192) -> dict:
    """Over a pairwise eval loader, in its order, the real pairs' (padding rows dropped) sequence log-probs
    `chosen`, `rejected` (sums over completion tokens) and their completion token counts `chosen_tokens`,
    `rejected_tokens`; numpy arrays [N]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, batch):
        (c, cm), (r, rm) = pair_token_logps(nnx.merge(graphdef, state), batch, chunk_size)
        return seq_logps(c, cm), seq_logps(r, rm), cm.sum(-1), rm.sum(-1)

    keys = [f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "completion_mask")]
    out = {k: [] for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    for batch in loader:
        keep = np.asarray(batch["example_weight"]) > 0
        for k, v in zip(out, jax.device_get(fn(state, {k: batch[k] for k in keys}))):
            out[k].append(np.asarray(v)[keep])
    return {k: np.concatenate(v) for k, v in out.items()}


def pair_reward_scores(reward_model, loader) -> tuple[np.ndarray, np.ndarray]:
    """A reward model's (`ScalarHeadModel`) scores r(x, y_w), r(x, y_l) [N] of the real pairs of a pairwise eval
    loader, in its order (the score at each sequence's last real token)."""
    from align_jax.models.heads import sequence_scores

    graphdef, state = nnx.split(reward_model)
    score = jax.jit(lambda state, ids, attn: sequence_scores(nnx.merge(graphdef, state), ids, attn))
    c, r = [], []
    for batch in loader:
        keep = np.asarray(batch["example_weight"]) > 0
        c.append(np.asarray(score(state, batch["chosen_input_ids"], batch["chosen_attention_mask"]))[keep])
        r.append(np.asarray(score(state, batch["rejected_input_ids"], batch["rejected_attention_mask"]))[keep])
    return np.concatenate(c), np.concatenate(r)


def preference_accuracy(model, loader, *, ref_model=None, chunk_size: int = 8192) -> dict:
    """Held-out preference accuracy over a pairwise eval loader (padding rows excluded)."""
    pair_logps, state = _sequence_logps_fn(model, chunk_size)
    ref, ref_state = _sequence_logps_fn(ref_model, chunk_size) if ref_model is not None else (None, None)

    hits = implicit = total = 0.0
    keys = [f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "completion_mask")]
    for batch in loader:
        b = {k: batch[k] for k in keys}
        w = batch["example_weight"]
        c, r = (np.asarray(x) for x in jax.device_get(pair_logps(state, b)))
        hits += float(((c > r) * w).sum())
        if ref is not None:
            rc, rr = (np.asarray(x) for x in jax.device_get(ref(ref_state, b)))
            implicit += float((((c - rc) > (r - rr)) * w).sum())
        total += float(w.sum())
    out = {"preference_accuracy": hits / max(total, 1.0)}
    if ref is not None:
        out["implicit_reward_accuracy"] = implicit / max(total, 1.0)
    return out
