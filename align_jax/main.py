"""Entry point: parses flags and calls `train(config, workdir)`.

    python -m align_jax.main --config=configs/dpo.py --workdir=/tmp/run --config.optimizer.learning_rate=5e-7
"""

from absl import app, flags, logging
from ml_collections import config_flags

from align_jax.train import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the exported model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax/grain are chatty at INFO; metrics go to the bar and files
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
