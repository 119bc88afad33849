"""Entry point: parses flags and calls `train(config, workdir)`.

    python -m align_jax.main --config=configs/dpo.py --workdir=/tmp/run --config.optimizer.learning_rate=5e-7
    python -m align_jax.main --config=configs/dpo.py --print_config     # every key, its value and its comment

A mistake in the data, the config, a path or a checkpoint is reported as one `error: ...` line (exit status 2);
`--verbose` (or ALIGN_JAX_VERBOSE=1) also shows the traceback and the libraries' INFO logs.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from align_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]); override any key with --config.<key>=<value>.",
    lock_config=False, accept_new_attributes=True)  # new keys only under loss.kwargs / rewards.kwargs (checked)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the exported model.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (every key, its value and "
                                  "its comment) and exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Tracebacks for user errors, and the libraries' INFO logs.")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    verbose = _VERBOSE.value or cli.verbose_from_env()
    cli.console(verbose)

    def go():
        if _CONFIG.value is None:
            raise cli.UserError("--config is required, e.g. --config=configs/dpo.py (see README.md)")
        config_arg = flags.FLAGS["config"].config_filename
        cli.check_override_keys(config_arg, flags.FLAGS["config"].override_values)
        if _PRINT_CONFIG.value:
            print(cli.describe(_CONFIG.value, config_arg))
            return
        if not _WORKDIR.value:
            raise cli.UserError("--workdir is required: the directory for checkpoints, logs and the export")
        from align_jax.train import train

        train(_CONFIG.value, _WORKDIR.value)

    cli.run(go, verbose)


def parse_flags(argv):
    """absl's flag parsing, except that `--help` exits 0 and a bad flag is one `error:` line (exit 2)."""
    if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (flag syntax, unknown --config.<key>, a value of the wrong type)
        if "--verbose" in argv or cli.verbose_from_env():
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}".replace("\n", " "), file=sys.stderr)
        print("(python -m align_jax.main --help; --print_config lists every config key)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
