"""Refuse a config that cannot work before anything compiles, naming the key."""

from __future__ import annotations

import jax

from align_jax.errors import UserError
from align_jax.losses import available
from align_jax.parallel import mesh_shape
from align_jax.train.algorithms import ALGORITHMS


class ConfigValueError(UserError, ValueError):
    pass


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
    if config.loss.name.startswith("dpo") and "loss_type" in config.loss.kwargs:
        bad("loss.kwargs.loss_type", "name the variant in config.loss.name (e.g. 'dpo:ipo') instead")
    for key in ("batch_size", "total_steps", "eval_batch_size", "chunk_size"):
        if not isinstance(config[key], int) or config[key] <= 0:
            bad(key, f"must be a positive integer, got {config[key]!r}")
    if config.optimizer.learning_rate < 0:
        bad("optimizer.learning_rate", "must be >= 0")
    if config.optimizer.grad_accum_steps < 1:
        bad("optimizer.grad_accum_steps", "must be >= 1")
    if config.checkpoint.every_steps <= 0:
        bad("checkpoint.every_steps", "must be > 0")
    if config.data.on_bad_example not in ("raise", "skip"):
        bad("data.on_bad_example", "must be 'raise' or 'skip'")
    if config.data.truncation_mode not in ("keep_start", "keep_end"):
        bad("data.truncation_mode", "must be 'keep_start' or 'keep_end'")
    buckets = tuple(config.data.length_buckets)
    if not buckets or max(buckets) < config.data.max_length:
        bad("data.length_buckets", f"the largest bucket must be >= data.max_length={config.data.max_length}")
    if config.data.packing and config.algorithm != "sft":
        bad("data.packing", "packing is for SFT only")
    if config.model.dtype not in ("float32", "bfloat16"):
        bad("model.dtype", "must be float32 or bfloat16")
    if algo.validate is not None:
        algo.validate(config)
    try:
        mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices=jax.device_count(),
                   key="config.mesh")
    except ValueError as e:
        raise ConfigValueError(str(e)) from None
