"""The one base class of every error a user can cause (bad data, config, paths, checkpoints, disk).

`python -m align_jax.main` (and the experiment scripts) print such an error as one message -- where (file:line
or config key), what was expected, what was found, how to fix it -- and exit with status 2, without a Python
traceback (`--verbose` or `ALIGN_JAX_VERBOSE=1` shows it). Anything else is a bug in align-jax and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose cause and fix are the user's (input files, config values, paths, disk space)."""


class ConfigValueError(UserError, ValueError):
    """A config value that cannot work; the message names the key (`config.<key>: ...`)."""


class SetupError(UserError, ValueError):
    """A config value that cannot work with the machine or the files it names (mesh, paths); names the key."""


def refuse(key: str, msg: str):
    """Raises ConfigValueError("config.<key>: <msg>")."""
    raise ConfigValueError(f"config.{key}: {msg}")
