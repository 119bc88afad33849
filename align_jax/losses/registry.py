"""String registry of losses, so a config names its objective ("dpo:sigmoid", "grpo:dr_grpo", ...).

    register("dpo:ipo", loss_type="ipo")(dpo_loss)   # stores functools.partial(dpo_loss, loss_type="ipo")
    get_loss("dpo:ipo")(c, r, rc, rr, beta=0.1, chosen_lengths=..., rejected_lengths=...)
    available()  # sorted list of names

A new variant is one function plus one `register(...)` line in its module. The built-in losses register
themselves when `align_jax.losses` is imported (importing this module imports the package first).
"""

from __future__ import annotations

import functools
from typing import Callable

_REGISTRY: dict[str, Callable] = {}


def register(name: str, *, overwrite: bool = False, **bound):
    """Decorator: `register(name, **bound)(fn)` registers `fn` (or `partial(fn, **bound)`) under `name`.

    Returns `fn` unchanged so it can be used as `@register("sft")`. Re-registering a name raises ValueError
    unless `overwrite=True`.
    """

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = functools.partial(fn, **bound) if bound else fn
        return fn

    return deco


def get_loss(name: str) -> Callable:
    """The callable registered under `name`; ValueError listing the known names if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(available())}") from None


def available() -> list[str]:
    """Sorted names of all registered losses."""
    return sorted(_REGISTRY)
