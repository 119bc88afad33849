"""One module per algorithm, each registering itself (`base.register`) in `ALGORITHMS`:

    sft             supervised fine-tuning on completions                          (sft.py)
    reward_model    Bradley-Terry / Plackett-Luce reward model                     (reward_model.py)
    dpo             DPO and its variants (IPO, cDPO, robust, SimPO-style, ...)     (dpo.py)
    listwise_dpo    DPO under Plackett–Luce on ranked groups                       (listwise_dpo.py)
    orpo            ORPO                                                           (orpo.py)
    grpo            GRPO online (sampling + reward functions)                      (grpo.py)
    grpo_offline    GRPO on ranked / scored groups                                 (grpo.py)
    rloo            REINFORCE leave-one-out (TRL RLOOTrainer)                      (rloo.py)
    ppo             PPO with a reward model and a value model (TRL PPOTrainer)     (ppo.py)

The interface an algorithm implements is `base.Algorithm` (documented there); README "Add an algorithm".
"""

from align_jax.algorithms.base import ALGORITHMS, Algorithm, get_algorithm, register
from align_jax.algorithms import dpo, grpo, listwise_dpo, orpo, ppo, reward_model, rloo, sft  # noqa: E402,F401  (register)

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm", "register"]
