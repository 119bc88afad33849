"""DPO (Rafailov et al. 2023) with TRL DPOTrainer's defaults (beta=0.1, sigmoid loss, linear lr decay).

    python -m align_jax.main --config=configs/dpo.py --workdir=/tmp/dpo
    python -m align_jax.main --config=configs/dpo.py:tiny --workdir=/tmp/dpo_tiny   # seconds, for tests
    python -m align_jax.main --config=configs/dpo.py:listwise --workdir=/tmp/ldpo  # ranked groups (Plackett–Luce)
    --config.loss.name=dpo:ipo  --config.loss.kwargs.beta=0.5  --config.model.init_from=/path/to/hf_dir

Default: the embedded toy task (policy and reference start from `model.init_from`, e.g. the SFT export).
"""

from align_jax.train.config_base import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.algorithm = "dpo"
    c.loss.name = "dpo:sigmoid"  # any dpo:* variant of align_jax.losses
    c.loss.kwargs = {"beta": 0.1, "label_smoothing": 0.0}
    c.loss.reference_free = False  # True: no reference model (ref log-probs 0)
    # The reference's log-probs computed once before training (and kept on disk next to the data), so the step
    # runs no reference forward; False: a live reference forward in every step (TRL's default)
    c.reference.precompute = True
    c.data.train = "toy:pairs"
    c.data.eval = "toy:eval_pairs"
    c.data.max_length = 64  # toy examples are ~20-45 tokens
    c.data.length_buckets = (32, 48, 64)
    c.optimizer.learning_rate = 1e-4  # tiny toy model; use ~5e-7 for billion-parameter models
    c.optimizer.schedule = "linear"
    c.batch_size = 16
    c.eval_batch_size = 64
    c.total_steps = 120
    c.eval_every = 0  # evaluate at the end only
    c.eval_generation = 100  # toy task: also answer 100 held-out prompts and score them per axis
    args = arg.split(",") if arg else []
    if "listwise" in args:  # listwise DPO (algorithms/listwise_dpo.py) on the toy task's ranked groups of 4
        c.algorithm = c.loss.name = "listwise_dpo"
        c.loss.kwargs = {"beta": 0.1}
        c.reference.precompute = False  # a live reference (no precomputed path for groups)
        c.data.train = "toy:groups_ranked"
        c.data.eval = ""
        c.data.kind = "groupwise"
        c.data.group_size = 4
        c.data.max_prompt_length = 0
        c.batch_size = 8  # groups (32 responses: the sequences of 16 pairs)
    if "tiny" in args:
        tiny(c, steps=6, checkpoint_every=3)
        # A live reference: a run of 6 steps reads 96 pairs, while precomputing reads all 2000 toy pairs (10 s on 2
        # cores, 45 s on 2 processes); the precomputed path is tested with small data files
        c.reference.precompute = False
        c.eval_batch_size = 64
        c.eval_batches = 2
        c.eval_every = 0
        c.eval_generation = 0
    return c
