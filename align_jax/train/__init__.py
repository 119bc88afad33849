"""The training system: one loop (`train`), algorithms as loss + batch preparation."""
from align_jax.train.loop import NonFiniteLossError, train
