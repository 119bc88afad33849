"""Scalar heads on the decoder: a reward model (InstructGPT / TRL `RewardTrainer`) and a value model (PPO).

Like transformers' `LlamaForSequenceClassification` with `num_labels=1` (what TRL's RewardTrainer trains), the
score is a bias-free linear map of the final hidden state at the *last real token* of each sequence; the value
model applies the same map at every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.models.config import ModelConfig
from align_jax.models.llama import Transformer


class ScalarHeadModel(nnx.Module):
    """Decoder + `score` head [D]. `model(ids, mask)` -> per-token scalars [B, T] (float32)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backbone: Transformer | None = None):
        self.backbone = backbone if backbone is not None else Transformer(config, rngs=rngs)
        std = 1.0 / (config.hidden_size + 1) ** 0.5  # TRL/transformers: normal(std=1/sqrt(D+1)) for the head
        self.score = nnx.Param((std * jax.random.normal(rngs.params(), (config.hidden_size,))).astype(
            config.param_dtype), logical_axes=("embed",))
        self.config = config

    def __call__(self, input_ids_BxT, attention_mask=None, positions=None, segment_ids=None):
        h = self.backbone(input_ids_BxT, attention_mask, positions, segment_ids, return_hidden=True)
        return jnp.einsum("btd,d->bt", h, self.score[...].astype(h.dtype), preferred_element_type=jnp.float32)


def last_token_index(attention_mask_BxT):
    """Index of the last real token of each (right-padded) row."""
    T = attention_mask_BxT.shape[1]
    idx = jnp.where(attention_mask_BxT.astype(bool), jnp.arange(T)[None], -1)
    return jnp.maximum(idx.max(axis=1), 0)


def sequence_scores(model: ScalarHeadModel, input_ids_BxT, attention_mask_BxT):
    """Reward r(x, y) [B]: the score at the last real token."""
    s_BxT = model(input_ids_BxT, attention_mask_BxT)
    return jnp.take_along_axis(s_BxT, last_token_index(attention_mask_BxT)[:, None], axis=1)[:, 0]
