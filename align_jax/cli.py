"""What every command-line entry point shares: console logging, user errors as one message, config discovery.

* `console(verbose)`: align-jax's own log lines (logger "align_jax") go to stderr as plain text (warnings as
  "warning: ..."); the libraries' INFO chatter (orbax, grain, absl) stays hidden unless `verbose`.
* `run(fn, verbose)`: calls `fn()`; an `align_jax.errors.UserError` (bad data, config, path, checkpoint, disk)
  is printed as one "error: ..." message and the process exits with status 2, without a traceback (shown with
  `--verbose` or `ALIGN_JAX_VERBOSE=1`). Any other exception is a bug and keeps its traceback.
* `check_override_keys(config_arg, overrides)`: a `--config.<key>` that the config does not have is refused
  with the closest existing key, except under the free-form option dicts (`loss.kwargs`, `rewards.kwargs`,
  whose keys are checked against the loss / reward function itself by `validate_config`).
* `describe(config, config_arg)`: the resolved config, one `key: value  # comment` line per field, the comments
  taken from the config files' source (`--print_config`).
"""

from __future__ import annotations

import difflib
import importlib.util
import io
import logging
import os
import sys
import tokenize

from align_jax.errors import UserError

FREE_FORM = ("loss.kwargs.", "rewards.kwargs.")  # option dicts whose keys belong to a function, not the config


def verbose_from_env() -> bool:
    return os.environ.get("ALIGN_JAX_VERBOSE", "") not in ("", "0", "false", "False")


class _Formatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def console(verbose: bool = False) -> None:
    """align-jax's INFO lines on stderr, plain; other libraries at WARNING (INFO with `verbose`)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    logger = logging.getLogger("align_jax")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_align_jax", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        handler._align_jax = True
        logger.addHandler(handler)
    logger.propagate = False


def run(fn, verbose: bool = False):
    """`fn()`, with user errors as one message and exit status 2 (a traceback only when `verbose`)."""
    try:
        return fn()
    except UserError as e:
        if verbose:
            raise
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pin_threads(n: int) -> None:
    """Restricts this process to its first `n` CPUs (0 = leave as is; the environment's ALIGN_JAX_PIN_CPU=k: to CPU
    k alone). Call before jax starts its CPU backend.

    XLA:CPU splits some reductions (e.g. the weight gradients' sums over batch x time) across its threads, one
    per CPU the process may use, so the same program gives results that differ in the last bits with 1 or 2
    cores; a training run amplifies such differences. With a fixed thread count the numbers depend only on the
    pinned packages and the CPU's instruction set (measured: 1 vs 2 cores differ, core 0 vs core 1 agree)."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cpu = os.environ.get("ALIGN_JAX_PIN_CPU")  # a child of experiments/ablation.parallel_cells: its own CPU
    if cpu is not None:
        os.sched_setaffinity(0, {int(cpu)})
        return
    if n <= 0:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > n:
        os.sched_setaffinity(0, cpus[:n])


# ------------------------------------------------------------------------------------------------ config files


def _split_arg(config_arg: str) -> tuple[str, str]:
    path, _, arg = config_arg.partition(":")
    return path, arg


def load_config_file(config_arg: str):
    """`get_config(arg)` of "path/to/config.py[:arg]" (what `--config` loads, without overrides)."""
    path, arg = _split_arg(config_arg)
    if not os.path.isfile(path):
        raise UserError(f"--config={config_arg}: no such file {path!r} (the configs are in configs/*.py)")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def flat_keys(config, prefix: str = "") -> dict:
    """{"a.b.c": value} of a (nested) ConfigDict or dict."""
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            sub = flat_keys(v, f"{prefix}{k}.")
            out.update(sub if sub else {f"{prefix}{k}": {}})
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_override_keys(config_arg: str, overrides) -> None:
    """Refuses `--config.<key>=...` for a key the config does not have (with the closest existing keys)."""
    known = flat_keys(load_config_file(config_arg))
    parents = {k.rsplit(".", 1)[0] for k in known if "." in k}
    for key in overrides:
        if key in known or key in parents:
            continue
        if any(key.startswith(p) for p in FREE_FORM):
            continue
        close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('--config.' + c for c in close)}?" if close else \
            "; `--print_config` lists every key"
        raise UserError(f"--config.{key}: the config has no key {key!r}{hint}")


def _comments(path: str) -> dict[str, str]:
    """{"a.b": comment} from the lines `c.a.b = ...  # comment` of a config source file, with the comment lines
    right above such a line."""
    with open(path) as f:
        src = f.read()
    line_comment, standalone = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                standalone[tok.start[0]] = text
            else:
                line_comment[tok.start[0]] = text
    out = {}
    lines = src.split("\n")
    for i, line in enumerate(lines, start=1):
        s = line.strip()
        if not s.startswith("c.") or "=" not in s:
            continue
        key = s[2:].split("=", 1)[0].strip()
        if not key.replace(".", "").replace("_", "").isalnum():
            continue
        above, j = [], i - 1
        while j in standalone:
            above.insert(0, standalone[j])
            j -= 1
        parts = above + ([line_comment[i]] if i in line_comment else [])
        if parts and key not in out:  # a file's first assignment documents the key (later ones are variants)
            out[key] = " ".join(parts)
    return out


def describe(config, config_arg: str, comment_source: str | None = None) -> str:
    """The resolved config as `key: value  # comment` lines (comments from config_base.py and the config file;
    the config file's comment wins; `comment_source`: the one source file that holds the comments instead)."""
    if comment_source:
        comments = _comments(comment_source)
    else:
        from align_jax.train import config_base

        comments = _comments(config_base.__file__)
        comments.update(_comments(_split_arg(config_arg)[0]))
    flat = flat_keys(config)
    width = max(len(f"{k}: {v!r}") for k, v in flat.items())
    lines = [f"# {config_arg}: set any key with --config.<key>=<value>"]
    for k, v in flat.items():
        text = f"{k}: {v!r}"
        c = comments.get(k, "")
        lines.append(f"{text:<{width}}  # {c}" if c else text)
    if "loss" in config:
        from align_jax.algorithms import ALGORITHMS
        from align_jax.train.validate import loss_options

        try:
            algo = ALGORITHMS.get(config.get("algorithm", ""))
            opts = loss_options(config.loss.name, algo.filled_loss_args if algo else ())
            lines.append(f"# loss.kwargs options of {config.loss.name}: "
                         + (", ".join(f"{k}={v!r}" for k, v in opts.items()) or "none"))
        except ValueError:
            pass
    return "\n".join(lines)
