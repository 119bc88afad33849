"""The interface between an algorithm and the training loop, and the registry of algorithms.

An algorithm is one module in `align_jax.algorithms` that builds an `Algorithm` record and calls `register`.
The loop (`align_jax.train`) sees nothing else: it builds the data of `data_kind`, the model (or the
algorithm's `build_model`), a frozen reference when `needs_reference`, then calls `loss` inside the jitted train
step and `eval` inside the jitted eval step; an online algorithm's `make_rollout` turns each prompt batch into
a training batch. The pure objectives live in `align_jax.losses`; an algorithm adapts batches to them.

    loss(model, batch, ref_model, cfg) -> (scalar loss, {name: scalar metric})     traced in the train step
    eval(model, batch, ref_model, cfg) -> {name: per-example [B] array}            traced in the eval step

`batch` holds the loader's (or the rollout's) numeric arrays plus `policy_is_reference` (a bool scalar, True
before the first update: the policy's weights are then exactly the reference's); `ref_model` is the frozen
reference (None when the algorithm needs none, the loss is reference-free, or its log-probs are precomputed);
`cfg` is the run's whole config. Eval quantities are averaged on the host with the batch's `example_weight`
(padding rows weigh 0), unless `summarize_eval` says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


def _one_step(config) -> int:
    return 1


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    # What the data pipeline produces: 'sft' | 'pairwise' | 'groupwise' | 'prompt_only'.
    data_kind: str
    loss: Callable
    eval: Callable
    needs_reference: bool = False  # a frozen copy of the initial policy (unless `loss.reference_free`)
    scalar_head: bool = False  # the trained model is a decoder + scalar head (a reward model)
    loss_prefixes: tuple[str, ...] = ()  # loss registry names ("<prefix>:*" or "<prefix>") it accepts
    # Loss keyword arguments the algorithm fills in from the batch, so they are not `loss.kwargs` options.
    filled_loss_args: tuple[str, ...] = ()
    supports_packing: bool = False  # `data.packing` (several examples per row, segment ids)
    # validate(config): extra checks, run by `validate_config` before anything is built; raise
    # `align_jax.errors.ConfigValueError` (`refuse(key, msg)`) naming the key.
    validate: Callable | None = None
    # build_model(config, mesh) -> the trainable module, when it is not the plain policy / scalar-head model
    # (PPO: policy + value model). Its `.policy`, if any, is what the reference copies, generation evaluates
    # and export writes.
    build_model: Callable | None = None
    # Online: make_rollout(config=, graphdef=, rest=, ref=(graphdef, params, rest, shardings), tokenizer=,
    # mesh=, workdir=) -> rollout(params, next_batch: () -> loader batch, step) -> (numpy batch, host metrics).
    make_rollout: Callable | None = None
    steps_per_rollout: Callable = _one_step  # (config) -> optimizer steps per rollout; runs are whole rollouts
    # precompute_reference(config, data, ref_model, mesh, tokenizer) -> data whose training batches carry the
    # reference's log-probs (`reference.precompute`), so no reference forward runs in the step.
    precompute_reference: Callable | None = None
    # summarize_eval(sums, total) -> metrics: from Σ_examples weight·quantity (`sums`) and Σ weight (`total`);
    # default: the weighted means.
    summarize_eval: Callable | None = None


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm, *, overwrite: bool = False) -> Algorithm:
    """Adds `algorithm` to the registry under its name (config.algorithm)."""
    if algorithm.name in ALGORITHMS and not overwrite:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"config.algorithm={name!r}: unknown; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
