"""Online RL: GRPO (`align_jax.rl.grpo`) and reward functions (`align_jax.rl.rewards`).

Importing this package registers the algorithms "grpo" (online, prompt-only data) and "grpo_offline" (ranked
groups) in `align_jax.train.algorithms.ALGORITHMS` (algorithms.py imports it at its end).
"""

from align_jax.rl import rewards
from align_jax.rl.grpo import (GRPORollout, completion_logps, group_advantages, make_grpo_rollout,
                               nan_group_advantages, offline_advantages, validate_grpo_config)
from align_jax.rl.rewards import REWARD_FUNCTIONS, get_reward_function, register_reward

__all__ = ["GRPORollout", "REWARD_FUNCTIONS", "completion_logps", "get_reward_function", "group_advantages",
           "make_grpo_rollout", "nan_group_advantages", "offline_advantages", "register_reward", "rewards",
           "validate_grpo_config"]
