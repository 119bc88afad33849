"""SFT: next-token negative log-likelihood of the completion tokens (`losses.sft_loss`), TRL `SFTTrainer` with
`completion_only_loss`; packed rows (`data.packing`) supported. Eval: token-weighted NLL and perplexity."""

from __future__ import annotations

import numpy as np

from align_jax import losses
from align_jax.algorithms.base import Algorithm, register
from align_jax.models.logps import completion_token_logps, seq_logps


def _token_logps(model, batch, cfg):
    return completion_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                  chunk_size=cfg.chunk_size, positions_BxT=batch.get("positions"),
                                  segment_ids_BxT=batch.get("segment_ids"))


def sft_loss(model, batch, ref_model, cfg):
    logps, mask = _token_logps(model, batch, cfg)
    return losses.sft_loss(logps, mask * batch["example_weight"][:, None])


def sft_eval(model, batch, ref_model, cfg):
    logps, mask = _token_logps(model, batch, cfg)
    return {"nll_sum": -seq_logps(logps, mask), "num_tokens": mask.sum(-1)}


def summarize_eval(sums: dict, total: float) -> dict:
    """Token-weighted NLL over the eval set and its perplexity exp(NLL)."""
    nll = sums["nll_sum"] / max(sums["num_tokens"], 1.0)
    return {"nll": nll, "perplexity": float(np.exp(nll))}


SFT = register(Algorithm("sft", "sft", sft_loss, sft_eval, loss_prefixes=("sft",), supports_packing=True,
                         summarize_eval=summarize_eval))
