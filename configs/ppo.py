"""PPO (the RLHF step of InstructGPT) with TRL 1.x PPOConfig's defaults unless noted: policy + value model, a
frozen reference (the initial policy) and a frozen reward model that scores each completion at its last token.

    python -m align_jax.main --config=configs/ppo.py --workdir=/tmp/ppo \\
        --config.model.init_from=/tmp/sft/export --config.ppo.reward_model=/tmp/rm/export
    python -m align_jax.main --config=configs/ppo.py:tiny ...        # seconds, for tests
    --config.ppo.value_model=shared   --config.ppo.kl_coef=0.1   --config.ppo.missing_eos_penalty=1.0

Batch = `batch_size` prompts per rollout, one completion each; a rollout feeds num_ppo_epochs x num_mini_batches
optimizer steps (`total_steps` counts optimizer steps). See align_jax/algorithms/ppo.py for the algorithm.
"""

import ml_collections
from ml_collections import config_dict

from align_jax.train.config_base import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.algorithm = "ppo"
    c.loss.name = "ppo:policy"  # the clipped surrogate (+ vf_coef x the clipped value loss)
    c.loss.kwargs = ml_collections.ConfigDict({})  # PPO's coefficients live in c.ppo

    c.ppo = ml_collections.ConfigDict()
    c.ppo.reward_model = ""  # export directory of a reward-model run (configs/reward_model.py): required
    # value model: "reward_model" (its backbone + head, TRL's usual set-up) | "policy" (a copy of the policy's
    # backbone, fresh head) | "shared" (a head on the policy's own hidden states) | another reward-model export
    c.ppo.value_model = "reward_model"
    c.ppo.num_ppo_epochs = 4  # passes over each rollout (TRL default 4)
    c.ppo.num_mini_batches = 1  # minibatches per pass (TRL default 1); batch_size must divide
    c.ppo.response_length = 12  # N new tokens at most (TRL default 53; toy answers are <= 7 tokens with EOS)
    # Sampling always stops after EOS (TRL with stop_token="eos"; TRL's default stop_token=None never stops).
    c.ppo.temperature = 0.7  # sampling temperature, also used for the log-probs (TRL default 0.7)
    c.ppo.kl_coef = 0.05  # per-token KL penalty coefficient (TRL default 0.05)
    c.ppo.kl_estimator = "k1"  # k1 (log ratio, TRL default) | k3
    c.ppo.cliprange = 0.2  # policy ratio clip (TRL default 0.2)
    c.ppo.cliprange_value = 0.2  # value clip (TRL default 0.2)
    c.ppo.vf_coef = 0.1  # value loss weight (TRL default 0.1)
    c.ppo.gamma = 1.0  # discount (TRL default 1.0)
    c.ppo.lam = 0.95  # GAE lambda (TRL default 0.95)
    c.ppo.whiten_rewards = False  # TRL default False
    c.ppo.missing_eos_penalty = config_dict.placeholder(float)  # None (unset) or a number; subtracted from the score of a completion without EOS (TRL default None)
    c.ppo.log_completions_every = 10  # steps between sample tables (<workdir>/samples.jsonl, TensorBoard text)
    c.ppo.num_completions_to_log = 8

    c.data.train = "toy:prompts"
    c.data.eval = ""  # online PPO is evaluated by generation (eval_generation)
    c.data.max_prompt_length = 24  # the fixed prompt bucket (toy prompts are <= 21 tokens with the template)
    c.data.max_length = 24
    c.data.length_buckets = (24,)
    # tuned on the toy task (experiments/toy_rlhf.py); TRL's PPOConfig inherits transformers' 5e-5 and its
    # example commands use 3e-6 for billion-parameter models
    c.optimizer.learning_rate = 1e-4
    # TRL decays linearly, stepping its scheduler once per rollout; constant here (the toy run is short).
    # "linear" decays per optimizer step (K times per rollout): the same line, sampled more finely.
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.max_grad_norm = 0.0  # TRL's PPOTrainer never clips gradients
    c.batch_size = 64  # prompts per rollout (TRL: per_device_train_batch_size 8 x grad accum x devices)
    c.total_steps = 120  # optimizer steps = rollouts x num_ppo_epochs x num_mini_batches (30 rollouts)
    c.checkpoint.every_steps = 60  # a multiple of num_ppo_epochs x num_mini_batches
    c.eval_every = 0
    c.eval_generation = 100  # toy task: answer 100 held-out prompts greedily and score them per axis
    if "tiny" in arg.split(","):
        tiny(c, steps=4, checkpoint_every=2)
        c.ppo.num_ppo_epochs = 2
        c.ppo.num_mini_batches = 1
        c.ppo.response_length = 8
        c.ppo.log_completions_every = 2
        c.eval_generation = 0
        c.export = False
    return c
