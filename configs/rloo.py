"""RLOO (REINFORCE Leave-One-Out, Ahmadian et al. 2024) with TRL 1.x RLOOTrainer's defaults (beta 0.05 folded
into the reward, epsilon 0.2, no advantage normalisation, num_iterations 1), on the toy task's prompts scored
by its gold reward; the same sampling budget as configs/grpo.py (TRL's default num_generations is 2).

    python -m align_jax.main --config=configs/rloo.py --workdir=/tmp/rloo --config.model.init_from=/tmp/sft/export
    python -m align_jax.main --config=configs/rloo.py:tiny --workdir=/tmp/rloo_tiny     # seconds, for tests
    --config.rloo.beta=0 --config.loss.reference_free=True     # no reference model
"""

import ml_collections

from align_jax.train.config_base import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.algorithm = "rloo"
    c.loss.name = "rloo"
    c.loss.kwargs = {"epsilon": 0.2}  # clip range; epsilon_high (None = epsilon)
    c.loss.reference_free = False  # False: keep a frozen reference (needed when rloo.beta > 0)

    c.rloo = ml_collections.ConfigDict()
    c.rloo.beta = 0.05  # KL coefficient, folded into the reward: r - beta * sum_t (log pi_old - log pi_ref)
    c.rloo.normalize_advantages = False  # True: advantages -> (A - mean) / (std + 1e-4) over the batch
    c.rloo.num_generations = 8  # G completions per prompt (TRL default 2)
    c.rloo.num_iterations = 1  # mu optimisation passes (steps) per rollout; checkpoint.every_steps % mu == 0
    c.rloo.max_completion_length = 12
    c.rloo.temperature = 1.0
    c.rloo.top_p = 1.0
    c.rloo.top_k = 0  # 0 = off
    c.rloo.mask_truncated_completions = False
    c.rloo.log_completions_every = 10
    c.rloo.num_completions_to_log = 8
    c.rloo.max_failed_reward_steps = 3

    c.rewards = ml_collections.ConfigDict()
    c.rewards.functions = ("toy_gold",)  # as configs/grpo.py
    c.rewards.weights = ()
    c.rewards.kwargs = ml_collections.ConfigDict({})

    c.data.train = "toy:prompts"
    c.data.eval = ""  # evaluated by generation (eval_generation)
    c.data.max_prompt_length = 24
    c.data.max_length = 24
    c.data.length_buckets = (24,)
    c.optimizer.learning_rate = 3e-4  # as configs/grpo.py (toy-scale model)
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.batch_size = 8  # prompts per step (x num_generations completions)
    c.total_steps = 100
    c.checkpoint.every_steps = 50
    c.eval_every = 0
    c.eval_generation = 100
    if "tiny" in arg.split(","):
        tiny(c, steps=4, checkpoint_every=2)
        c.rloo.num_generations = 2
        c.rloo.max_completion_length = 8
        c.rloo.log_completions_every = 2
        c.eval_generation = 0
        c.export = False
    return c
