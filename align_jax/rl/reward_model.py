"""A trained reward model (the reward-model trainer's export) as a reward: on token ids (PPO) and on text
(GRPO's `"rm:<dir>"`).

Two forms of reward-model directory are read (`load_reward_model`), both with the tokenizer files:
  * transformers' `*ForSequenceClassification` with `num_labels=1` (`align_jax.models.save_reward_model`, what
    the reward-model trainer exports; also TRL RewardTrainer outputs): config.json naming that architecture,
    the backbone under `model.*` and the head `w` as `score.weight` [1, D];
  * the older causal-LM form: the backbone as a causal LM (config.json + safetensors) plus `score_head.npy` [D].
The reward is

    r(x, y) = w · h_L(x ⧺ y)[t*]        t* = the last real token (attention mask 1) of the row

with h_L the final (normed) hidden states, as `align_jax.models.heads.sequence_scores`. transformers'
`LlamaForSequenceClassification` (what TRL's RewardTrainer trains) takes t* = the last token that is not
`pad_token_id` instead: the same on right-padded rows unless the last real token is the pad id (a tokenizer whose
pad token is its EOS; see `save_reward_model`).

Text (`RewardModelReward`). Prompt + completion are tokenized exactly as the reward-model trainer's data pipeline
tokenizes the *chosen* side of a pairwise example (`align_jax.data.tokenize.tokenize_pairwise`): plain text is
`tokenizer(prompt + completion + EOS)` (EOS text appended unless already there; the tokenizer's own special
tokens, e.g. BOS, added), conversations are `apply_chat_template(prompt + [assistant completion])`; then the same
`max_prompt_length` / `max_length` truncation. So the score is read at the token the head was trained on: the
EOS that ends every training completion (or the template's end of turn).

Where TRL differs: TRL 1.x `GRPOTrainer` scores a reward model on the *decoded* text `prompt + completion`
(special tokens skipped at decoding, so no EOS) re-tokenized with `add_special_tokens=False` (no BOS either) and
no truncation; for a text-trained reward model (TRL's RewardTrainer appends EOS too) that reads the head at the
completion's last word, a position it was never trained on. We follow the training tokenization instead, since
the Bradley-Terry loss only calibrates the head at the EOS position. For conversational data both render the
chat template, so they agree when the template ends the turn with a token (no truncation assumed).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.data import tokenize
from align_jax.data.formats import InvalidRecord
from align_jax.models.checkpoint import (CheckpointError, is_sequence_classification, load_pretrained,
                                         load_sequence_classification)
from align_jax.models.heads import ScalarHeadModel, last_token_index
from align_jax.models.llama import default_positions

log = logging.getLogger(__name__)

HEAD_FILE = "score_head.npy"
DEFAULT_BUCKETS = (64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------- loading


def _read_head(path: str) -> np.ndarray:
    """`score_head.npy` as a float array. A bfloat16 head is stored by numpy as raw 2-byte records ('|V2'):
    viewed back as bfloat16."""
    head = np.load(os.path.join(path, HEAD_FILE))
    if head.dtype.kind == "V" and head.dtype.itemsize == 2:
        import ml_dtypes

        head = head.view(ml_dtypes.bfloat16)
    if head.ndim != 1:
        raise CheckpointError(f"{path}/{HEAD_FILE}: expected a [hidden_size] vector, got shape {head.shape}")
    return head


def load_reward_model(path: str, *, mesh=None, dtype: str = "float32") -> ScalarHeadModel:
    """Loads a reward model in either form of the module docstring: a `*ForSequenceClassification` directory
    (`load_sequence_classification`: head = `score.weight`), else a causal-LM backbone (`load_pretrained`) with
    `score_head.npy`. Each backbone weight goes straight into its sharding on `mesh` when given; the head
    `score` is sharded by its logical axis "embed".

    ValueError naming `path` when it is not a reward model (no config.json; or a causal LM without
    score_head.npy, e.g. a policy export) or the head does not match the backbone's hidden size."""
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path!r} is not a reward model: config.json is missing (expected a Hugging Face "
                              "model directory: the reward-model trainer's export)")
    if is_sequence_classification(path):
        backbone, head = load_sequence_classification(path, dtype=dtype, mesh=mesh)
    else:
        if not os.path.exists(os.path.join(path, HEAD_FILE)):
            raise CheckpointError(f"{path!r} is not a reward model: its config.json is not a "
                                  f"*ForSequenceClassification and {HEAD_FILE} is missing (a reward model is a "
                                  f"sequence classifier with num_labels=1, or a causal-LM backbone + {HEAD_FILE}; a "
                                  f"policy export has neither)")
        head = _read_head(path)
        backbone = load_pretrained(path, dtype=dtype, mesh=mesh)
        D = backbone.config.hidden_size
        if head.shape != (D,):
            raise CheckpointError(f"{path}/{HEAD_FILE}: shape {head.shape} does not match hidden_size={D} of "
                                  f"config.json")
    model = ScalarHeadModel(backbone.config, rngs=nnx.Rngs(0), backbone=backbone)
    value = np.asarray(head, dtype=np.dtype(backbone.config.param_dtype))
    if mesh is not None:
        from jax.sharding import NamedSharding

        from align_jax.parallel import logical_to_spec

        spec = logical_to_spec(model.score.get_metadata().get("logical_axes"), value.shape, mesh)
        model.score.set_value(jax.device_put(value, NamedSharding(mesh, spec)))
    else:
        model.score.set_value(jnp.asarray(value))
    return model


# ---------------------------------------------------------------------------------------------- token ids


@functools.partial(jax.jit, static_argnums=0)
def _score_jit(graphdef, state, input_ids_BxT, attention_mask_BxT):
    model = nnx.merge(graphdef, state)
    positions_BxT = default_positions(attention_mask_BxT)  # cumsum(mask) - 1: left padding starts at 0
    s_BxT = model(input_ids_BxT, attention_mask_BxT, positions_BxT)
    return jnp.take_along_axis(s_BxT, last_token_index(attention_mask_BxT)[:, None], axis=1)[:, 0]


def score_token_ids(model: ScalarHeadModel, input_ids_BxT, attention_mask_BxT) -> jax.Array:
    """Reward [B] float32: the score at the last real token of each row (largest index with mask 1).

    Any padding works: left-padded prompts followed by right-padded completions (PPO's query ⧺ response) give
    the same result as the right-padded rows, since positions are `cumsum(mask) - 1` and padded keys are
    masked. Jitted once per (shape, dtype, sharding); the graph definition is static."""
    graphdef, state = nnx.split(model)
    return _score_jit(graphdef, state, jnp.asarray(input_ids_BxT, jnp.int32),
                      jnp.asarray(attention_mask_BxT, jnp.int32))


# ---------------------------------------------------------------------------------------------- text


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n; past the largest, the largest doubled until it fits."""
    for b in buckets:
        if b >= n:
            return b
    b = buckets[-1]
    while b < n:
        b *= 2
    return b


def _as_pair(prompt, completion):
    """(prompt, completion, conversational) in the forms `tokenize.prompt_and_completions` takes."""
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise TypeError(f"a text prompt needs a text completion, got {type(completion).__name__}")
        return prompt, completion, False
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return list(prompt), list(completion), True


class RewardModelReward:
    """A reward function `fn(prompts, completions, **kwargs) -> list[float | None]` from a reward-model export.

    Each (prompt, completion) is tokenized as the chosen side of a pairwise training example (module docstring:
    EOS appended to text completions, chat template for conversations, the same truncation: pass the trainer's
    `data.max_length` / `max_prompt_length` / `truncation_mode` to reproduce it; `max_length=None` keeps
    everything). Rows are sorted by length, batched `batch_size` at a time (the last batch padded with dummy
    rows), right-padded to the smallest of `length_buckets` that fits (the largest doubled beyond it), so
    `score_token_ids` compiles once per bucket. A row that cannot be tokenized (keep_start with a prompt of
    >= max_length tokens, as the pipeline refuses) gets None, i.e. "no reward" (`align_jax.rl.rewards`).
    """

    def __init__(self, path: str, *, batch_size: int = 32, max_length: int | None = None,
                 max_prompt_length: int | None = None, truncation_mode: str = "keep_start",
                 length_buckets: tuple[int, ...] = DEFAULT_BUCKETS, mesh=None, dtype: str = "float32"):
        from transformers import AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = path
        self.model = load_reward_model(path, mesh=mesh, dtype=dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.batch_size = batch_size
        self.mesh = mesh
        self.buckets = tuple(sorted(length_buckets))
        # max_length=None: a limit no sequence reaches (TokenizeConfig needs an int).
        self.cfg = tokenize.TokenizeConfig(max_length or 2**62, max_prompt_length, truncation_mode)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.__name__ = f"rm:{path}"

    def tokenize(self, prompt, completion) -> np.ndarray:
        """The ids the reward model was trained on for (prompt, completion) (`tokenize_pairwise`'s chosen)."""
        prompt, completion, conv = _as_pair(prompt, completion)
        seqs, _ = tokenize._sequences(*tokenize.prompt_and_completions(self.tokenizer, prompt, [completion], conv),
                                      self.cfg)
        return seqs[0][0]

    def _put(self, x):
        if self.mesh is None:
            return x
        from align_jax.parallel import batch_sharding, replicated

        replicas = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return jax.device_put(x, batch_sharding(self.mesh) if x.shape[0] % replicas == 0 else replicated(self.mesh))

    def score_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        """Scores [N] float32 of token-id rows (batched, bucketed, padded as the class docstring says)."""
        out = np.zeros((len(rows),), np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        B = self.batch_size
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            T = _bucket(max(len(rows[i]) for i in idx), self.buckets)
            ids = np.full((B, T), self.pad_id, np.int32)
            mask = np.zeros((B, T), np.int32)
            mask[len(idx):, 0] = 1  # dummy rows: one token, so that no row is fully masked
            for r, i in enumerate(idx):
                ids[r, :len(rows[i])], mask[r, :len(rows[i])] = rows[i], 1
            s = jax.device_get(score_token_ids(self.model, self._put(ids), self._put(mask)))
            out[idx] = np.asarray(s)[:len(idx)]
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        rows, ok = [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                rows.append(self.tokenize(p, c))
                ok.append(i)
            except InvalidRecord as e:
                log.warning("%s: completion %d cannot be scored: %s", self.__name__, i, e)
        out: list[float | None] = [None] * len(prompts)
        if rows:
            for i, s in zip(ok, self.score_ids(rows)):
                out[i] = float(s)
        return out

    def __repr__(self):
        return f"RewardModelReward({self.path!r}, batch_size={self.batch_size})"
