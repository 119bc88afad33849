"""Refuse a config that cannot work before anything compiles, naming the key."""

from __future__ import annotations

import inspect
import math

import jax

from align_jax.algorithms import ALGORITHMS
from align_jax.errors import ConfigValueError, SetupError
from align_jax.losses import available, get_loss
from align_jax.models import lora
from align_jax.parallel import mesh_shape

__all__ = ["ConfigValueError", "check_batch_divisibility", "loss_options", "validate_config"]


def validate_config(config) -> None:
    def bad(key, msg):
        raise ConfigValueError(f"config.{key}: {msg}")

    if config.algorithm not in ALGORITHMS:
        bad("algorithm", f"{config.algorithm!r} is unknown; choose one of {sorted(ALGORITHMS)}")
    algo = ALGORITHMS[config.algorithm]
    if config.loss.name not in available():
        bad("loss.name", f"{config.loss.name!r} is unknown; known: {', '.join(available())}")
    if config.loss.name.split(":")[0] not in algo.loss_prefixes:
        bad("loss.name", f"{config.loss.name!r} is not a loss of algorithm {config.algorithm!r} "
                         f"(expected one of {algo.loss_prefixes}:*)")
    if "loss_type" in config.loss.kwargs:
        bad("loss.kwargs.loss_type", "name the variant in config.loss.name (e.g. 'dpo:ipo') instead")
    for key in ("batch_size", "total_steps", "eval_batch_size", "chunk_size"):
        if not isinstance(config[key], int) or config[key] <= 0:
            bad(key, f"must be a positive integer, got {config[key]!r}")
    _check_loss_kwargs(config, algo, bad)
    _check_optimizer(config.optimizer, bad)
    if not _finite(config.get("num_epochs", 0.0)) or config.get("num_epochs", 0.0) < 0:
        bad("num_epochs", f"must be a finite number >= 0 (0 = use total_steps), got {config.num_epochs!r}")
    if config.checkpoint.every_steps <= 0:
        bad("checkpoint.every_steps", "must be > 0")
    if not isinstance(config.checkpoint.keep, int) or config.checkpoint.keep < 1:
        bad("checkpoint.keep", f"must be an integer >= 1 (checkpoints kept; 0 would keep none, so a stopped run "
                               f"could not resume), got {config.checkpoint.keep!r}")
    if config.data.on_bad_example not in ("raise", "skip"):
        bad("data.on_bad_example", "must be 'raise' or 'skip'")
    if config.data.truncation_mode not in ("keep_start", "keep_end"):
        bad("data.truncation_mode", "must be 'keep_start' or 'keep_end'")
    buckets = tuple(config.data.length_buckets)
    if not buckets or max(buckets) < config.data.max_length:
        bad("data.length_buckets", f"the largest bucket must be >= data.max_length={config.data.max_length}")
    plen = config.data.get("packing_length", 0)
    if not isinstance(plen, int) or (plen and plen < config.data.max_length):
        bad("data.packing_length", f"must be 0 (= data.max_length) or an integer >= data.max_length="
                                   f"{config.data.max_length}, got {plen!r}")
    if config.data.packing and not algo.supports_packing:
        supported = sorted(a.name for a in ALGORITHMS.values() if a.supports_packing)
        bad("data.packing", f"algorithm {config.algorithm!r} does not pack rows (packing is for {', '.join(supported)} "
                            f"only)")
    if config.reference.precompute and algo.needs_reference and algo.precompute_reference is None \
            and algo.make_rollout is None:
        bad("reference.precompute", f"not available for algorithm {config.algorithm!r}")
    if config.model.dtype not in ("float32", "bfloat16"):
        bad("model.dtype", "must be float32 or bfloat16")
    if config.get("lora") is not None:
        lora.validate(config.lora)
    if config.eval_suites:
        from align_jax.evaluation.suites import SUITES

        unknown = [x for x in config.eval_suites.split(",") if x.strip() not in SUITES]
        if unknown:
            bad("eval_suites", f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
        if algo.scalar_head:
            bad("eval_suites", "the suites evaluate a policy; a reward model is evaluated by data.eval (or "
                               "`python -m align_jax.evaluate --reward_model=...` after training)")
        for key in ("eval_suites_max_prompts", "eval_suites_max_new_tokens"):
            if not isinstance(config[key], int) or config[key] <= 0:
                bad(key, f"must be a positive integer, got {config[key]!r}")
    _check_toy_defaults(config, algo, bad)
    if algo.validate is not None:
        algo.validate(config)
    try:
        mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices=jax.device_count(),
                   key="config.mesh")
    except ValueError as e:
        raise ConfigValueError(str(e)) from None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_optimizer(o, bad) -> None:
    if not _finite(o.learning_rate) or o.learning_rate <= 0:
        bad("optimizer.learning_rate", f"must be a finite number > 0, got {o.learning_rate!r}")
    if not isinstance(o.grad_accum_steps, int) or o.grad_accum_steps < 1:
        bad("optimizer.grad_accum_steps", "must be an integer >= 1")
    if not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        bad("optimizer.warmup_steps", f"must be an integer >= 0, got {o.warmup_steps!r}")
    for key, lo, hi in (("min_lr_ratio", 0.0, 1.0), ("b1", 0.0, 1.0), ("b2", 0.0, 1.0)):
        v = o[key]
        if not _finite(v) or not lo <= v <= hi or (key != "min_lr_ratio" and v == 1.0):
            bad(f"optimizer.{key}", f"must be in [{lo}, {hi}{']' if key == 'min_lr_ratio' else ')'}, got {v!r}")
    for key in ("weight_decay", "max_grad_norm"):
        if not _finite(o[key]) or o[key] < 0:
            bad(f"optimizer.{key}", f"must be a finite number >= 0, got {o[key]!r}")
    if not _finite(o.eps) or o.eps <= 0:
        bad("optimizer.eps", f"must be a finite number > 0, got {o.eps!r}")


def loss_options(name: str, filled=()) -> dict:
    """{option: default} that `loss.kwargs` may set for the registered loss `name` (its keyword arguments, minus
    those bound by the registry and those the algorithm fills in from the batch, `filled`)."""
    fn = get_loss(name)
    bound = set(getattr(fn, "keywords", {}) or {})
    sig = inspect.signature(getattr(fn, "func", fn))
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in bound | set(filled)}


def _check_loss_kwargs(config, algo, bad) -> None:
    options = loss_options(config.loss.name, algo.filled_loss_args)
    for key in config.loss.kwargs:
        if key not in options:
            bad(f"loss.kwargs.{key}", f"is not an option of loss {config.loss.name!r}; its options are "
                                      f"{', '.join(f'{k} (default {v!r})' for k, v in options.items())}")


def _check_toy_defaults(config, algo, bad) -> None:
    """Toy-task defaults must not silently stay in a run on the user's own data."""
    if config.data.train.startswith("toy:"):
        return
    if config.data.eval.startswith("toy:"):
        bad("data.eval", f"is the toy task's held-out set {config.data.eval!r} but data.train is your data "
                         f"({config.data.train!r}): set --config.data.eval=<your held-out file> (same format), or "
                         f"--config.data.eval='' for no evaluation")
    toy_rewards = [f for f in (config.get("rewards", {}).get("functions", ()) or ()) if f.startswith("toy_")]
    if toy_rewards and algo.make_rollout is not None:
        bad("rewards.functions", f"{toy_rewards} score the toy task's prompts only, but data.train is your data "
                                 f"({config.data.train!r}): set --config.rewards.functions to your reward "
                                 f"functions ('module:function' or 'rm:<reward model dir>')")


def check_batch_divisibility(config, mesh) -> None:
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % replicas:
            raise SetupError(f"config.{key}={config[key]} is not divisible by the data-parallel size "
                             f"{replicas} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    per_replica = config.batch_size // replicas
    if per_replica % config.optimizer.grad_accum_steps:
        raise SetupError(f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps} does not divide "
                         f"the per-replica batch {per_replica} (config.batch_size / {replicas})")
