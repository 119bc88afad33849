"""Entry point of the evaluation: parses flags and calls `evaluation.suites.evaluate(config, out)`.

    python -m align_jax.evaluate --model=<workdir | HF dir> [--reference=<...>] [--reward_model=<...>] \
        [--suite=ifeval,safety,rewardbench,compare,toy] --out=<dir> [--config=configs/evaluate.py[:tiny]] \
        [--config.generation.max_new_tokens=256 ...]

`--model`, `--reference`, `--reward_model` and `--suite` are shorthands for `--config.model`, `--config.reference`,
`--config.reward_model` and `--config.suites`. Writes `<out>/results.json` (every number, the config, the
versions) and `<out>/results.md` (one table per suite), and prints the tables. A mistake in a path, a data file or
a config value is one `error: ...` line and exit status 2, as in training.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from align_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "evaluate.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Evaluation config (configs/evaluate.py[:tiny]);"
                                          " override any key with --config.<key>=<value>.", lock_config=False,
                                          accept_new_attributes=True)  # unknown keys: checked below, one message
_MODEL = flags.DEFINE_string("model", None, "The policy: a training workdir (its export/) or a Hugging Face "
                             "directory (= --config.model).")
_REFERENCE = flags.DEFINE_string("reference", None, "The reference policy (= --config.reference).")
_REWARD_MODEL = flags.DEFINE_string("reward_model", None, "A reward model export (= --config.reward_model).")
_SUITE = flags.DEFINE_string("suite", None, "Comma-separated suites (= --config.suites).")
_OUT = flags.DEFINE_string("out", None, "Output directory for results.json and results.md.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Tracebacks for user errors, and the libraries' INFO logs.")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    verbose = _VERBOSE.value or cli.verbose_from_env()
    cli.console(verbose)

    def go():
        cli.check_override_keys(flags.FLAGS["config"].config_filename, flags.FLAGS["config"].override_values)
        config = _CONFIG.value
        for key, flag in (("model", _MODEL), ("reference", _REFERENCE), ("reward_model", _REWARD_MODEL),
                          ("suites", _SUITE)):
            if flag.value is not None:
                config[key] = flag.value
        if _PRINT_CONFIG.value:
            from align_jax.evaluation import suites

            print(cli.describe(config, flags.FLAGS["config"].config_filename, comment_source=suites.__file__))
            return
        if not _OUT.value:
            raise cli.UserError("--out is required: the directory for results.json and results.md")
        from align_jax.evaluation.suites import evaluate

        evaluate(config, _OUT.value)

    cli.run(go, verbose)


if __name__ == "__main__":
    app.run(main)
