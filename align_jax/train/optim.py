"""Optimizer from config: optax AdamW (or SGD) with warmup + cosine/linear/constant decay and global-norm
gradient clipping. Gradient accumulation is done in the train step (a scan over micro-batches), so one optax
update is one optimizer step."""

from __future__ import annotations

import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """`cfg`: learning_rate, warmup_steps, schedule, min_lr_ratio. Warmup is linear from 0."""
    lr, warmup = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = lr * cfg.get("min_lr_ratio", 0.0)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, warmup + decay_steps, end)
    if cfg.schedule == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                     optax.linear_schedule(lr, end, decay_steps)], [warmup])
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [warmup])
    raise ValueError(f"config.optimizer.schedule={cfg.schedule!r}; choose one of {SCHEDULES}")


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.get("momentum", None))
    else:
        raise ValueError(f"config.optimizer.name={cfg.name!r}; choose 'adamw' or 'sgd'")
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.chain(*parts, opt), schedule
