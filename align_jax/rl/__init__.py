"""Online RL: GRPO (`align_jax.rl.grpo`), PPO (`align_jax.rl.ppo`), reward functions (`align_jax.rl.rewards`) and
trained reward models as rewards (`align_jax.rl.reward_model`).

Importing this package registers the algorithms "grpo" (online, prompt-only data), "grpo_offline" (ranked
groups) and "ppo" in `align_jax.train.algorithms.ALGORITHMS` (algorithms.py imports it at its end).
"""

from align_jax.rl import rewards
from align_jax.rl.grpo import (GRPORollout, completion_logps, group_advantages, make_grpo_rollout,
                               nan_group_advantages, offline_advantages, validate_grpo_config)
from align_jax.rl.ppo import PolicyValueModel, PPORollout, ppo_advantages, validate_ppo_config
from align_jax.rl.rewards import REWARD_FUNCTIONS, get_reward_function, register_reward

__all__ = ["GRPORollout", "PPORollout", "PolicyValueModel", "REWARD_FUNCTIONS", "completion_logps",
           "get_reward_function", "group_advantages", "make_grpo_rollout", "nan_group_advantages",
           "offline_advantages", "ppo_advantages", "register_reward", "rewards", "validate_grpo_config",
           "validate_ppo_config"]
