"""GRPO (Shao et al. 2024) with TRL 1.x GRPOTrainer's defaults (loss_type dapo, beta 0, epsilon 0.2, group
scaling, num_iterations 1), on prompts with programmatic rewards.

    python -m align_jax.main --config=configs/grpo.py --workdir=/tmp/grpo --config.model.init_from=/tmp/sft/export
    python -m align_jax.main --config=configs/grpo.py:tiny --workdir=/tmp/grpo_tiny     # seconds, for tests
    python -m align_jax.main --config=configs/grpo.py:offline --workdir=/tmp/grpo_off   # ranked groups, no sampling
    --config.loss.name=grpo:dr_grpo  --config.loss.kwargs.beta=0.04  --config.grpo.num_iterations=2
    --config.rewards.functions='("toy_correctness","toy_format")' --config.rewards.weights='(1.0,0.5)'

Default: the embedded toy task's prompts (toy:prompts) scored by its gold reward; the policy and the frozen
reference start from `model.init_from` (e.g. the SFT export). Batch = `batch_size` prompts x
`grpo.num_generations` completions per optimizer step.
"""

import ml_collections

from align_jax.train.config_base import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.algorithm = "grpo"
    c.loss.name = "grpo"  # grpo:{grpo,bnpo,dapo,dr_grpo,gspo}; plain "grpo" = loss_type dapo (TRL 1.x default)
    # beta: KL coefficient (k3 estimator); epsilon / epsilon_high: clip range (epsilon_high None = epsilon);
    # importance_sampling_level: token | sequence (GSPO)
    c.loss.kwargs = {"beta": 0.0, "epsilon": 0.2}
    c.loss.reference_free = False  # False: keep a frozen reference (KL logged; needed when beta > 0)

    c.grpo = ml_collections.ConfigDict()
    c.grpo.num_generations = 8  # G completions per prompt
    c.grpo.num_iterations = 1  # mu optimisation passes (steps) per rollout; checkpoint.every_steps % mu == 0
    c.grpo.max_completion_length = 12  # N new tokens at most (toy answers are <= 7 tokens with EOS)
    c.grpo.temperature = 1.0
    c.grpo.top_p = 1.0
    c.grpo.top_k = 0  # 0 = off
    c.grpo.scale_rewards = "group"  # group | batch | none (Dr. GRPO)
    c.grpo.mask_truncated_completions = False  # True: completions without EOS do not count in the loss
    c.grpo.log_completions_every = 10  # steps between sample tables (<workdir>/samples.jsonl, TensorBoard text)
    c.grpo.num_completions_to_log = 8
    # stop with an error when every reward function fails on every completion of this many consecutive rollouts
    # (0 = never): such a run trains on zero advantages
    c.grpo.max_failed_reward_steps = 3
    c.grpo.offline_advantages = "ranks"  # grpo_offline: ranks (rank_advantages) | scores (group-normalised)

    c.rewards = ml_collections.ConfigDict()
    # registered names (align_jax.rl.rewards: toy_gold, toy_correctness, toy_format, toy_safety, length_penalty)
    # or "module:function"; combined as sum_k w_k r_k
    c.rewards.functions = ("toy_gold",)
    c.rewards.weights = ()  # one per function; () = all 1.0
    c.rewards.kwargs = ml_collections.ConfigDict({})  # {"length_penalty": {"soft_punish_cache": 4}}

    c.data.train = "toy:prompts"
    c.data.eval = ""  # online GRPO is evaluated by generation (eval_generation)
    c.data.max_prompt_length = 24  # the fixed prompt bucket (toy prompts are <= 21 tokens with the template)
    c.data.max_length = 24
    c.data.length_buckets = (24,)
    # tuned on the toy task (experiments/toy_grpo.py: SFT gold reward 0.30 -> ~0.96 in 100 steps, ~2 min on 2 CPU
    # cores); TRL's default learning rate 1e-6 is for billion-parameter models
    c.optimizer.learning_rate = 3e-4
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.batch_size = 8  # prompts per step (x num_generations completions)
    c.total_steps = 100
    c.checkpoint.every_steps = 50
    c.eval_every = 0
    c.eval_generation = 100  # toy task: answer 100 held-out prompts greedily and score them per axis
    if "offline" in arg.split(","):
        c.algorithm = "grpo_offline"
        c.loss.reference_free = True  # beta = 0: no reference forward
        c.data.train = "toy:groups_ranked"
        c.data.eval = ""
        c.data.kind = "groupwise"
        c.data.group_size = 4
        c.data.max_prompt_length = 0
        c.data.max_length = 64
        c.data.length_buckets = (32, 48, 64)
    if "tiny" in arg.split(","):
        tiny(c, steps=4, checkpoint_every=2)
        c.grpo.num_generations = 2
        c.grpo.max_completion_length = 8
        c.grpo.log_completions_every = 2
        c.eval_generation = 0
        c.export = False
    return c
