"""Reward model (InstructGPT / TRL RewardTrainer): decoder + scalar head at the last token, Bradley-Terry on
pairs (soft labels supported), or Plackett-Luce on ranked groups (`:groupwise`).

    python -m align_jax.main --config=configs/reward_model.py --workdir=/tmp/rm
    python -m align_jax.main --config=configs/reward_model.py:groupwise --workdir=/tmp/rm_groups
"""

from align_jax.train.config_base import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.algorithm = "reward_model"
    c.loss.name = "reward"
    c.loss.kwargs = {}  # e.g. {"center_rewards_coefficient": 0.01} (TRL RewardConfig)
    c.data.train = "toy:pairs_soft"
    c.data.eval = "toy:eval_pairs"
    c.optimizer.learning_rate = 1e-4
    c.batch_size = 32
    c.total_steps = 300
    args = set(arg.split(",")) if arg else set()
    if "groupwise" in args:
        c.loss.name = "ranking"
        c.loss.kwargs = {}
        c.data.kind = "groupwise"
        c.data.train = "toy:groups_ranked"
        c.data.eval = ""
        c.data.group_size = 4
    if "tiny" in args:
        tiny(c, steps=4, checkpoint_every=2)
        c.eval_batches = 1
    return c
