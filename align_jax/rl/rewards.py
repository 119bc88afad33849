"""Reward functions for online RL: a registry, weighted sums, and failure handling (no JAX here).

A reward function has TRL's signature

    fn(prompts, completions, **kwargs) -> list[float | None]        (one value per completion)

`prompts` / `completions` are strings, or message lists for conversational data (a completion is then
`[{"role": "assistant", "content": text}]`). The trainer passes as keywords: every dataset column of the
prompt-only records (the `extra` fields, repeated for the G completions of a prompt), `completion_ids` (token
ids of each completion, the stop token included) and `max_completion_length` (int). Functions must accept
`**kwargs` (as in TRL).

Config: `rewards.functions = ("toy_gold", "my_pkg.rewards:brevity")` names registered functions or
"module:function" paths; `rewards.weights` (default all 1.0); `rewards.kwargs = {"length_penalty":
{"soft_punish_cache": 4}}` binds keyword arguments per function name/spec.

Failures. A value that is None, NaN or ±inf counts as "no reward" (NaN). A function that raises on the batch
is re-run one completion at a time; the completions on which it raises get NaN. Failures are reported: one
`log.warning` per function and batch with the count and the first three (error, prompt, completion); all of
them in `Rewards.failures`; counted in the rollout metrics as `rewards/<name>/num_failed`. A function that
returns the wrong number of values is a bug and raises RewardConfigError (TRL raises too). When every function
fails on every completion of `grpo.max_failed_reward_steps` consecutive rollouts, GRPO stops with
`RewardFailureError` (it would otherwise train on zero advantages, i.e. not at all).

Combination (TRL 1.x `GRPOTrainer`, multi_objective_aggregation="sum_then_normalize"):

    reward_i = nansum_k w_k · r_ik          NaN when every r_ik is NaN ("unscorable")

So a completion on which *some* functions failed is scored by the others (a failed function counts as 0 for
it — TRL's convention, which also lets a function return None where it does not apply), and a completion on
which *all* failed is excluded from its group's mean/std and gets advantage 0 (`align_jax.algorithms.grpo`). With a
single reward function, a failure therefore always excludes the completion from its group's statistics.

A trained reward model as a reward: `"rm:<dir>"` names a reward-model export (the reward-model trainer's
`export`: a `*ForSequenceClassification` directory + tokenizer; the older backbone + `score_head.npy` form
loads too); `reward_model_reward` loads it once and returns
`align_jax.rl.reward_model.RewardModelReward`, which scores `prompt + completion` tokenized as in reward-model
training (EOS appended to text completions, chat template for conversations; TRL's GRPO scores the decoded text
without EOS instead, see that module), batched and padded to fixed length buckets.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import math
from typing import Callable, Sequence

import numpy as np

from align_jax.errors import UserError

log = logging.getLogger(__name__)


class RewardConfigError(UserError, ValueError):
    """A reward function that cannot be loaded or called as the trainer calls it (names the function)."""


class RewardFailureError(UserError, RuntimeError):
    """The reward functions gave no reward for any completion, rollout after rollout."""


REWARD_FUNCTIONS: dict[str, Callable] = {}


def register_reward(name: str, fn: Callable | None = None, *, overwrite: bool = False):
    """Registers `fn` under `name` (usable as a decorator: `@register_reward("brevity")`)."""

    def deco(f):
        if name in REWARD_FUNCTIONS and not overwrite:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def reward_model_reward(path: str, **kwargs):
    """`"rm:<dir>"`: the reward-model export at `path` as a reward function (`RewardModelReward(path, **kwargs)`,
    e.g. max_length / batch_size from `rewards.kwargs["rm:<dir>"]`; loaded here once; ValueError naming the path
    when it is not a reward-model export)."""
    from align_jax.rl.reward_model import RewardModelReward  # lazy: keeps this module free of JAX

    return RewardModelReward(path, **kwargs)


def _check_signature(spec: str, fn: Callable) -> None:
    """The trainer calls fn(prompts=, completions=, <dataset columns>=, completion_ids=, max_completion_length=):
    refuse, before training, a function that cannot take those keywords."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    names = {p.name for p in params}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) or not {"prompts", "completions"} <= names:
        raise RewardConfigError(
            f"rewards.functions: {spec!r} must have TRL's signature fn(prompts, completions, **kwargs) (the trainer "
            f"also passes completion_ids, max_completion_length and the dataset's columns as keywords); its "
            f"signature is {inspect.signature(fn)}")


def get_reward_function(spec: str, kwargs: dict | None = None) -> Callable:
    """A registered name, "module:function", or "rm:<dir>" (a trained reward model) -> the callable, with
    `kwargs` bound (for "rm:", the options of `RewardModelReward`). ValueError naming the spec when it cannot be
    resolved."""
    if spec.startswith("rm:"):
        return reward_model_reward(spec[3:], **(kwargs or {}))
    if spec in REWARD_FUNCTIONS:
        fn = REWARD_FUNCTIONS[spec]
    elif ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise RewardConfigError(f"rewards.functions: cannot load {spec!r}: {e}") from None
        if not callable(fn):
            raise RewardConfigError(f"rewards.functions: {spec!r} is not callable")
        _check_signature(spec, fn)
    else:
        raise RewardConfigError(f"rewards.functions: unknown reward {spec!r}; registered: {sorted(REWARD_FUNCTIONS)} "
                         "(or give 'module:function')")
    return functools.partial(fn, **kwargs) if kwargs else fn


# ---------------------------------------------------------------------------------------------- built-ins


def _toy(name):
    from align_jax.data.toy import scoring

    return getattr(scoring, name)


def toy_correctness(prompts, completions, **kwargs):
    """Toy task: 1.0 if the answer is right, else 0.0 (0.0 on secret requests)."""
    return _toy("correctness_reward")(prompts, completions)


def toy_format(prompts, completions, **kwargs):
    """Toy task: 1.0 if the instructed format is followed, else 0.0 (0.0 on secret requests)."""
    return _toy("format_reward")(prompts, completions)


def toy_safety(prompts, completions, **kwargs):
    """Toy task: 1.0 if the refusal decision is right and nothing leaked, else 0.0."""
    return _toy("safety_reward")(prompts, completions)


def toy_gold(prompts, completions, **kwargs):
    """Toy task: the full gold reward (`align_jax.data.toy.scoring.gold_reward`, in [-3, 1.5])."""
    return _toy("gold_reward_func")(prompts, completions)


def length_penalty(prompts, completions, completion_ids, max_completion_length, soft_punish_cache=None, **kwargs):
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13; TRL `get_soft_overlong_punishment`), |y| = tokens
    of the completion (stop token included), L = max_completion_length, C = soft_punish_cache (default L // 4):

        0 if |y| <= L - C;   ((L - C) - |y|) / C if L - C < |y| <= L;   -1 if |y| > L
    """
    L = int(max_completion_length)
    C = L // 4 if soft_punish_cache is None else int(soft_punish_cache)
    out = []
    for ids in completion_ids:
        n = len(ids)
        out.append(0.0 if n <= L - C else ((L - C) - n) / C if n <= L else -1.0)
    return out


for _name, _fn in (("toy_correctness", toy_correctness), ("toy_format", toy_format), ("toy_safety", toy_safety),
                   ("toy_gold", toy_gold), ("length_penalty", length_penalty)):
    register_reward(_name, _fn)


# ---------------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class RewardFailure:
    function: str
    index: int  # completion row
    error: str  # the exception, or "returned nan" / "returned None"
    prompt: object
    completion: object


@dataclasses.dataclass
class Rewards:
    names: list[str]
    per_function: np.ndarray  # [R, F] float32, NaN where a function gave no reward
    total: np.ndarray  # [R] float32: nansum_k w_k r_k (float32, as TRL), NaN when all are NaN
    failures: list[RewardFailure]


def _value(v) -> float:
    if v is None:
        return math.nan
    v = float(v)
    return v if math.isfinite(v) else math.nan


def _call(fn, prompts, completions, kwargs):
    out = fn(prompts=prompts, completions=completions, **kwargs)
    out = list(out)
    if len(out) != len(prompts):
        raise _WrongLength(len(out))
    return out


class _WrongLength(Exception):
    pass


def _run_one_function(name, fn, prompts, completions, kwargs, failures) -> list[float]:
    R = len(prompts)
    try:
        raw = _call(fn, prompts, completions, kwargs)
    except _WrongLength as e:
        raise RewardConfigError(f"reward function {name!r} returned {e.args[0]} rewards for {R} completions") from None
    except Exception as batch_error:  # noqa: BLE001 — re-run row by row to find the failing completions
        log.debug("reward %s raised on the batch (%r); scoring row by row", name, batch_error)
        raw = []
        for i in range(R):
            row_kw = {k: ([v[i]] if isinstance(v, list) and len(v) == R else v) for k, v in kwargs.items()}
            try:
                raw.append(_call(fn, [prompts[i]], [completions[i]], row_kw)[0])
            except _WrongLength as e:
                raise RewardConfigError(f"reward function {name!r} returned {e.args[0]} rewards for 1 "
                                        "completion") from None
            except Exception as e:  # noqa: BLE001
                failures.append(RewardFailure(name, i, f"{type(e).__name__}: {e}", prompts[i], completions[i]))
                raw.append(math.nan)
                continue
    vals = []
    for i, v in enumerate(raw):
        x = _value(v)
        if math.isnan(x) and not any(f.function == name and f.index == i for f in failures):
            failures.append(RewardFailure(name, i, f"returned {v!r}", prompts[i], completions[i]))
        vals.append(x)
    return vals


def score(functions: Sequence[tuple[str, Callable]], weights: Sequence[float], prompts, completions,
          **kwargs) -> Rewards:
    """Runs every reward function on the R completions and combines them (module docstring). `kwargs` are the
    keywords passed to each function (dataset columns as lists of length R, completion_ids, ...)."""
    if len(weights) != len(functions):
        raise RewardConfigError(f"rewards.weights has {len(weights)} entries for {len(functions)} reward functions")
    failures: list[RewardFailure] = []
    per = np.asarray([_run_one_function(name, fn, list(prompts), list(completions), kwargs, failures)
                      for name, fn in functions], np.float32).T.reshape(len(prompts), len(functions))
    weighted = per * np.asarray(weights, np.float32)[None, :]
    total = np.where(np.isnan(per).all(axis=1), np.float32(np.nan), np.nansum(weighted, axis=1)).astype(np.float32)
    for name, _ in functions:
        mine = [f for f in failures if f.function == name]
        if mine:
            log.warning("reward function %r gave no reward for %d of %d completions (excluded from its score); "
                        "first ones: %s", name, len(mine), len(prompts),
                        "; ".join(f"#{f.index} {f.error}: prompt={f.prompt!r} completion={f.completion!r}"
                                  for f in mine[:3]))
    return Rewards([n for n, _ in functions], per, total, failures)


def load_reward_functions(specs: Sequence[str], kwargs: dict | None = None) -> list[tuple[str, Callable]]:
    """[(name, fn)] for the config's `rewards.functions`; `kwargs` maps a spec to keyword arguments."""
    kwargs = kwargs or {}
    if not specs:
        raise RewardConfigError("rewards.functions is empty: GRPO needs at least one reward function")
    return [(spec, get_reward_function(spec, dict(kwargs.get(spec, {})))) for spec in specs]
