"""Fused / memory-lean ops."""

from align_jax.ops.logprobs import naive_token_logps, token_logps, token_logps_remat

__all__ = ["naive_token_logps", "token_logps", "token_logps_remat"]
