"""Online RL building blocks shared by the online algorithms (`align_jax.algorithms.grpo`, `.rloo`, `.ppo`):
reward functions (`rewards`), trained reward models as rewards (`reward_model`) and the rollout machinery
(`rollout`: prompt bucket, rollout schedule, group sampling + scoring, sample log)."""

from align_jax.rl import rewards
from align_jax.rl.rewards import REWARD_FUNCTIONS, get_reward_function, register_reward

__all__ = ["REWARD_FUNCTIONS", "get_reward_function", "register_reward", "rewards"]
