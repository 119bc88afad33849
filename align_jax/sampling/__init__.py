"""Batched KV-cache generation (greedy / temperature / top-k / top-p) for the NNX decoder."""

from align_jax.sampling.generate import SampleOutput, Sampler, SamplingParams, default_eos_ids, generate, mesh_of
from align_jax.sampling.processors import process_logits, sample_token, token_logp

__all__ = ["SampleOutput", "Sampler", "SamplingParams", "default_eos_ids", "generate", "mesh_of",
           "process_logits", "sample_token", "token_logp"]
