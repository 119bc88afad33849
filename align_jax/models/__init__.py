"""The decoder (Llama / Mistral / Qwen2 / Qwen3) and Hugging Face checkpoint I/O."""
from align_jax.models.checkpoint import (CheckpointError, load_pretrained, load_sequence_classification,
                                        save_pretrained, save_reward_model)
from align_jax.models.config import ConfigError, ModelConfig, from_hf_config, load_hf_config, to_hf_config
from align_jax.models.llama import Transformer, default_positions, init_model
