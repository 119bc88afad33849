"""ORPO (Hong et al. 2024), TRL ORPOTrainer defaults (beta=0.1): NLL on chosen + odds-ratio term; no reference.

    python -m align_jax.main --config=configs/orpo.py --workdir=/tmp/orpo
"""

from align_jax.train.config_base import base_config, tiny


def get_config(arg: str = ""):
    c = base_config()
    c.algorithm = "orpo"
    c.loss.name = "orpo"
    c.loss.kwargs = {"beta": 0.1}
    c.data.train = "toy:pairs"
    c.data.eval = "toy:eval_pairs"
    c.optimizer.learning_rate = 8e-6  # TRL ORPOConfig default
    c.batch_size = 32
    c.total_steps = 200
    if arg == "tiny":
        tiny(c, steps=4, checkpoint_every=2)
        c.eval_batches = 1
    return c
