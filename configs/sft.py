"""Supervised fine-tuning (TRL SFTTrainer semantics: token-mean NLL over completion / assistant tokens).

    python -m align_jax.main --config=configs/sft.py --workdir=/tmp/sft
    python -m align_jax.main --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny

Default: the embedded toy task's noisy SFT corpus, from a randomly initialised toy model.
"""

from align_jax.train.config_base import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.algorithm = "sft"
    c.loss.name = "sft"
    c.loss.kwargs = {}
    c.data.train = "toy:sft"
    c.data.eval = ""  # held-out SFT data ("" = none)
    c.data.packing = False  # True: pack several examples per row
    c.model.init_from = "toy"
    c.data.max_length = 64  # toy examples are ~20-45 tokens
    c.data.length_buckets = (32, 48, 64)
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0
    c.batch_size = 32
    c.total_steps = 400
    c.checkpoint.every_steps = 200
    c.eval_every = 0
    if arg == "tiny":
        tiny(c, steps=6, checkpoint_every=3)
        c.optimizer.warmup_steps = 2
    return c
