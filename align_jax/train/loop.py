"""`train(config, workdir)`: the one training loop shared by every algorithm.

Setup (validated before anything compiles): mesh -> tokenizer -> TFDS dataset + Grain loader -> the resolved
config (`num_epochs` -> `total_steps`) -> the workdir (a restart's config compared with `<workdir>/config.json`,
a finished run returns at once, the checkpoint directory probed for writing, config.json written) -> model
(loaded or initialised straight into its shardings) -> frozen reference (DPO) -> optax -> state -> Orbax manager
(resume from the latest readable checkpoint if there is one, data iterator included).

Loop: dispatch step k, then read step k-1's metrics (one step late, so the host never waits on the device
mid-step); log every step to metrics.jsonl, every `log_every` to TensorBoard and the console; evaluate every
`eval_every`; checkpoint every `checkpoint.every_steps`, at the end, and on SIGTERM (preemption) or Ctrl-C (then
KeyboardInterrupt; a second Ctrl-C interrupts at once). A non-finite loss, gradient or update stops the run
after saving the last good state (the step skipped the bad update). The console gets a few lines at the start
(devices and mesh, model, data, steps), one per evaluation, and a summary at the end.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from align_jax.algorithms import get_algorithm
from align_jax.errors import UserError
from align_jax.evaluation import generation_eval
from align_jax.models import lora
from align_jax.parallel import batch_specs, host_batch, make_mesh, same_shapes_across_processes, to_device
from align_jax.train import checkpointing
from align_jax.train.checkpointing import Checkpointer
from align_jax.train.data import make_data, resolve_config
from align_jax.train.metrics_io import MetricsWriter, ProgressBar, ZeroGradWatch, final_metrics
from align_jax.train.model import build_model, build_reference, check_model_dirs, export, policy_of
from align_jax.train.optim import make_optimizer
from align_jax.train.state import init_state
from align_jax.train.step import all_finite, jit_eval_step, jit_train_step
from align_jax.train.tokenizer import load_tokenizer
from align_jax.train.validate import check_batch_divisibility, validate_config

log = logging.getLogger(__name__)


# Consecutive steps with a gradient norm of exactly 0 before the loop warns that nothing is learning.
ZERO_GRAD_STEPS = 3


class NonFiniteLossError(UserError, RuntimeError):
    pass


def evaluate(eval_fn, params, ref_params, loader_fn, mesh, max_batches: int = 0, summarize=None) -> dict:
    """Weighted means over the eval set of the algorithm's per-example quantities (padding rows weigh 0), or
    `summarize(sums, total)` of the weighted sums and the total weight (`Algorithm.summarize_eval`)."""
    sums, total = {}, 0.0
    for i, batch in enumerate(iter(loader_fn())):
        if max_batches and i >= max_batches:
            break
        host = same_shapes_across_processes(host_batch(batch))
        out = jax.device_get(eval_fn(params, to_device(host, mesh), ref_params))
        w = host["example_weight"]
        if jax.process_count() > 1:  # the outputs cover the global batch: so must the weights (process order)
            w = np.asarray(multihost_utils.process_allgather(w, tiled=True))
        total += float(w.sum())
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float((np.asarray(v) * w).sum())
    if summarize is not None:
        return {f"eval/{k}": v for k, v in summarize(sums, total).items()}
    return {f"eval/{k}": v / max(total, 1.0) for k, v in sums.items()}


def _prepare_workdir(config, workdir: str, ckpt_dir: str, data_fingerprint: str = "") -> dict | None:
    """Before anything is built: a restart (a checkpoint exists) must use the config the run started with, except
    for the keys that are safe to change (`checkpointing.check_resumed_config`); a finished run (final checkpoint
    and final log line present) returns its last metrics without touching a file; then the checkpoint directory
    is probed for writing and `<workdir>/config.json` written. Returns the finished run's metrics, or None."""
    steps = checkpointing.step_dirs(ckpt_dir)
    record = checkpointing.config_record(config)
    if data_fingerprint:  # the training data's content, not only its path, must match on resume
        record["data_fingerprint"] = data_fingerprint
    saved = checkpointing.read_config_record(workdir)
    if steps and saved is not None:
        changed = checkpointing.check_resumed_config(saved, record, workdir, steps[-1])
        if changed:
            log.info("resuming with changed settings (allowed on resume): %s", "; ".join(changed))
    elif steps:
        log.warning("%s has checkpoints but no config.json: the config cannot be compared with the one the run "
                    "started with (the model's shapes still are)", workdir)
    if steps and steps[-1] >= config.total_steps:
        last = final_metrics(os.path.join(workdir, "metrics.jsonl"), steps[-1])
        if last is not None and config.export and not os.path.exists(os.path.join(workdir, "export", "config.json")):
            log.info("run in %s is complete but has no export: writing it", workdir)
        elif last is not None:
            log.info("run in %s is complete (step %d of %d); nothing to do", workdir, steps[-1], config.total_steps)
            return last
    checkpointing.check_writable(ckpt_dir)
    if jax.process_index() == 0:
        checkpointing.write_config_record(workdir, record)
    return None


def _close_all(closers, raise_first: bool) -> None:
    """Runs every closer even when some fail (a failed async save re-raises on wait/close): the first error is
    raised when `raise_first` (nothing else is propagating), the others are logged."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001
            if raise_first and first is None:
                first = e
            else:
                log.debug("while closing: %s: %s", type(e).__name__, e)
    if first is not None:
        raise first


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items())


def _shares_arrays(a, b) -> bool:
    """Some array of tree `a` is an array of tree `b` (the same buffer, not an equal copy)."""
    ids = {id(x) for x in jax.tree.leaves(b)}
    return any(id(x) in ids for x in jax.tree.leaves(a))


def train(config, workdir: str) -> dict:
    """Runs (or resumes) the experiment described by `config` in `workdir`; returns the last metrics."""
    validate_config(config)
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    algorithm = get_algorithm(config.algorithm)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, key="config.mesh")
    check_batch_divisibility(config, mesh)
    check_model_dirs(config)
    tokenizer = load_tokenizer(config)
    data = make_data(config, workdir, tokenizer, algorithm)
    config = resolve_config(config, data, algorithm)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    finished = _prepare_workdir(config, workdir, ckpt_dir, data.train_fingerprint)
    if finished is not None:
        return finished
    model = build_model(config, mesh, algorithm)
    ref_model = build_reference(config, model, algorithm)

    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    frozen = frozen_shardings = None
    if lora.enabled(config):  # only the adapters (and scalar heads) are trained; the base weights are `frozen`
        graphdef, params, frozen, rest = nnx.split(model, lora.trainable_filter(), nnx.Param, ...)
        frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        full_rest = nnx.merge_state(frozen, rest)  # what merges with the trained params into the whole module
    else:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        full_rest = rest
    frozen_args = () if frozen is None else (frozen,)
    state = init_state(tx, params, mesh, config.seed)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    if ref_model is not None:
        ref_graphdef, ref_params, ref_rest = nnx.split(ref_model, nnx.Param, ...)
        ref_shardings = jax.tree.map(lambda x: x.sharding, ref_params)
    else:
        ref_graphdef = ref_params = ref_rest = ref_shardings = None
    eval_ref = (ref_graphdef, ref_params, ref_rest, ref_shardings)  # rollouts and generation evals
    if frozen is not None and ref_model is not None and _shares_arrays(ref_params, frozen):
        # LoRA: the reference is the policy's own weights with the adapters off (`lora.adapters_off`); the train /
        # eval step makes it from its own arguments (the trained adapters, switched off, and the frozen base
        # weights), so no array is passed twice; online algorithms take π_ref from the rollout, which runs the
        # `eval_ref` view (the same buffers)
        if algorithm.make_rollout is None:
            off_graphdef, _, _, off_rest = nnx.split(ref_model, lora.trainable_filter(), nnx.Param, ...)
            ref_graphdef, ref_params, ref_rest, ref_shardings = off_graphdef, None, off_rest, None
        else:
            ref_graphdef = ref_params = ref_rest = ref_shardings = None
    pair_ref = (ref_graphdef, ref_params, ref_rest, ref_shardings)  # held-out pair evals: always a live reference
    # precomputed reference log-probs (the numbers the live reference gives; `Algorithm.precompute_reference`)
    if ref_model is not None and config.reference.precompute and algorithm.precompute_reference is not None:
        data = algorithm.precompute_reference(config, data, ref_model, mesh, tokenizer)
        ref_graphdef = ref_params = ref_rest = ref_shardings = None

    train_iter = iter(data.train)
    ckpt = Checkpointer(ckpt_dir, config.checkpoint)
    try:
        start = ckpt.restore_latest(state, train_iter)
    except BaseException:
        _close_all([ckpt.close], raise_first=False)
        raise
    if start is not None:
        state = start[0]
    start_step = int(jax.device_get(state["step"]))
    if main:
        m = mesh.shape
        devices = jax.devices()
        log.info("mesh: data=%d fsdp=%d tensor=%d over %d %s devices%s", m["data"], m["fsdp"], m["tensor"],
                 len(devices), devices[0].platform, f" ({jax.process_count()} processes)"
                 if jax.process_count() > 1 else "")
        n_params = sum(x.size for x in jax.tree.leaves(params)) + sum(x.size for x in jax.tree.leaves(frozen or {}))
        dtype = config.model.dtype + (f" (compute {config.model.compute_dtype})" if config.model.compute_dtype
                                      and config.model.compute_dtype != config.model.dtype else "")
        log.info("model: %s from %s, %.2f M parameters, %s%s", type(model).__name__, config.model.init_from,
                 n_params / 1e6, dtype, "" if frozen is None else
                 f"; LoRA rank {config.lora.rank} on {config.lora.target_modules}: "
                 f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.3f} M trainable ({config.lora.dtype})")
        log.info("data: train %s (%d examples, %d skipped, %d truncated); eval %s", config.data.train,
                 len(data.train_source), data.num_skipped, getattr(data.skips, "num_truncated", 0),
                 config.data.eval or "none")
        log.info("training: %s (%s), steps %d -> %d of batch %d%s; workdir %s", config.algorithm, config.loss.name,
                 start_step, config.total_steps, config.batch_size, " (resumed)" if start_step else "", workdir)

    replicated = NamedSharding(mesh, P())
    common = dict(graphdef=graphdef, rest=rest, ref_graphdef=ref_graphdef, ref_rest=ref_rest, algorithm=algorithm,
                  cfg=config, mesh=mesh)
    step_fn = None
    eval_fn = None

    def run_eval():
        out = run_pair_eval()
        if (config.eval_generation or config.eval_suites) and not algorithm.scalar_head:
            policy = policy_of(nnx.merge(graphdef, state["params"], full_rest))
            reference = nnx.merge(eval_ref[0], eval_ref[1], eval_ref[2]) if eval_ref[0] is not None else None
            out.update(generation_eval(config, policy, tokenizer, workdir, reference=reference))
        return out

    def run_pair_eval():
        nonlocal eval_fn
        if data.eval is None:
            return {}
        if eval_fn is None:
            first = host_batch(next(iter(data.eval())))
            eval_fn = jit_eval_step(params_shardings=state_shardings["params"],
                                    batch_shardings=batch_specs(first, mesh), ref_shardings=pair_ref[3],
                                    out_sharding=replicated, graphdef=graphdef, rest=rest, ref_graphdef=pair_ref[0],
                                    ref_rest=pair_ref[2], algorithm=algorithm, cfg=config, mesh=mesh,
                                    frozen_shardings=frozen_shardings)
        return evaluate(lambda p, b, r: eval_fn(p, b, r, *frozen_args), state["params"], pair_ref[1], data.eval,
                        mesh, config.eval_batches, algorithm.summarize_eval)

    def log_eval(step, out):
        writer.write(step, out, tensorboard=True)
        if out and main:
            log.info("eval at step %d: %s", step, _fmt(out))

    writer = bar = None
    stop = {"sigterm": False, "signal": ""}

    def on_signal(signum, frame):  # SIGTERM (preemption) or Ctrl-C: checkpoint at the end of this step, then stop
        stop.update(sigterm=True, signal=signal.Signals(signum).name)
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    old_handler = signal.signal(signal.SIGTERM, on_signal)
    old_int_handler = signal.signal(signal.SIGINT, on_signal)
    pending = None  # (step, metrics on device, tokens, time the step's iteration began): read one step late
    last_done = [0.0]  # when the last flushed step was seen finished
    last = {}
    zero_grad = ZeroGradWatch(ZERO_GRAD_STEPS)
    finite_fn = jax.jit(all_finite)

    def flush(p):
        """Logs pending step `p`."""
        nonlocal last
        step, metrics, n_tokens, t_begin = p
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step to finish
        # The step's wall time: from when the step before it finished (or its own iteration began, if later:
        # after an eval or a checkpoint) to when it finished. Dispatch is asynchronous, so this is the time the
        # step adds to the run, whichever of the host and the device is the slower.
        t_done = time.perf_counter()
        dt = t_done - max(t_begin, last_done[0])
        last_done[0] = t_done
        m["step_seconds"] = dt
        m["tokens_per_second"] = n_tokens / max(dt, 1e-9)
        if "rollout_seconds" in m:  # online: the rest of the step is the update (and the host work around it)
            m["timing/update_seconds"] = max(dt - m["rollout_seconds"], 0.0)
        m["skipped_examples"] = float(data.num_skipped)
        m["truncated_examples"] = float(getattr(data.skips, "num_truncated", 0))
        writer.write(step, m, tensorboard=(step % config.log_every == 0 or step == config.total_steps))
        bar.update(step, m)
        last = m
        if rollout is None and main:  # online RL: a zero gradient is normal when every group's rewards tie
            zero_grad.update(step, m["grad_norm"])
        if m["nonfinite"] > 0:
            good = int(jax.device_get(state["step"]))
            what = (f"non-finite loss, gradient or update at step {step} (loss {m['loss']:.6g}, gradient norm "
                    f"{m['grad_norm']:.6g}, learning rate {m['learning_rate']:.3g})")
            if not bool(jax.device_get(finite_fn((state["params"], state["opt_state"])))):
                raise NonFiniteLossError(f"{what}; the state it started from (step {good}) is itself not finite "
                                         f"(check model.init_from): nothing was saved")
            ckpt.save(good, state, train_iter, force=True)
            ckpt.wait()
            raise NonFiniteLossError(f"{what}; the update was skipped and the last good state (step {good}) is "
                                     f"saved in {ckpt.directory}")

    ok = False
    try:
        writer = MetricsWriter(workdir, enabled=main)
        writer.truncate_after(start_step)  # a killed run may have logged steps after its last checkpoint
        bar = ProgressBar(config.total_steps, start_step, enabled=main, bar=config.progress_bar,
                          log_every=config.log_every)
        # Online algorithms (GRPO, PPO) turn each prompt batch into a training batch by sampling from the current
        # policy and scoring the samples: `rollout(params, next_batch, step) -> (numpy batch, host metrics)`.
        rollout = algorithm.make_rollout(config=config, graphdef=graphdef, rest=full_rest, ref=eval_ref,
                                         tokenizer=tokenizer, mesh=mesh, workdir=workdir) \
            if algorithm.make_rollout else None
        step = start_step
        while step < config.total_steps:
            t_begin = time.perf_counter()
            rollout_metrics = {}
            if rollout is not None:
                # Sampling needs the previous update's weights, so the host waits for that step here anyway: log it
                # now, so that each step's time is its own rollout + update (read one step late, the interval of
                # every step but the last also held the next step's sampling, and the last none)
                if pending is not None:
                    flush(pending)
                    pending = None
                batch, rollout_metrics = rollout(state["params"], lambda: next(train_iter), step)
            else:
                batch = same_shapes_across_processes(host_batch(next(train_iter)))
            n_tokens = sum(float(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
            if jax.process_count() > 1:  # this process's rows: the step's throughput counts every process's
                n_tokens = float(np.sum(multihost_utils.process_allgather(np.float64(n_tokens))))
            dev_batch = to_device(batch, mesh)
            if step_fn is None:
                step_fn = jit_train_step(state_shardings=state_shardings,
                                         batch_shardings=batch_specs(batch, mesh), ref_shardings=ref_shardings,
                                         metric_sharding=replicated, tx=tx, schedule=schedule,
                                         accum=config.optimizer.grad_accum_steps,
                                         frozen_shardings=frozen_shardings, **common)
            state, metrics = step_fn(state, dev_batch, ref_params, *frozen_args)
            step += 1
            if pending is not None:
                flush(pending)
            pending = (step, {**metrics, **rollout_metrics}, n_tokens, t_begin)
            if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
                flush(pending)
                pending = None
                log_eval(step, run_eval())
            if step % config.checkpoint.every_steps == 0 or stop["sigterm"]:
                if pending is not None:  # the log then matches the checkpoint exactly
                    flush(pending)
                    pending = None
                ckpt.save(step, state, train_iter)
            if stop["sigterm"]:
                log.warning("%s: checkpoint saved at step %d in %s; run the same command again to resume",
                            stop["signal"], step, ckpt_dir)
                break
        if pending is not None:
            flush(pending)
        if not stop["sigterm"]:
            final_eval = run_eval()
            if final_eval and main:
                log.info("eval at step %d: %s", step, _fmt(final_eval))
            last.update(final_eval)
            ckpt.save(step, state, train_iter, force=True)
            ckpt.wait()
            if config.export:
                export(config, nnx.merge(graphdef, state["params"], full_rest), tokenizer,
                       os.path.join(workdir, "export"))
            # the last line: a re-run of this workdir finds it and has nothing to do
            writer.write(step, final_eval, tensorboard=True, final=True)
            if main:
                log.info("done: step %d of %d in %.1f s (%d steps), final loss %s; checkpoints in %s, metrics in %s, "
                         "TensorBoard in %s%s", step, config.total_steps, time.perf_counter() - t_start,
                         step - start_step, f"{last['loss']:.4f}" if "loss" in last else "n/a", ckpt_dir,
                         os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tensorboard"),
                         f", export in {os.path.join(workdir, 'export')}" if config.export else "")
        ok = True
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        signal.signal(signal.SIGINT, old_int_handler)
        _close_all([ckpt.wait, ckpt.close] + [x.close for x in (bar, writer) if x is not None], raise_first=ok)
    if stop["signal"] == "SIGINT":  # the checkpoint is saved; the command line reports the interruption (exit 130)
        raise KeyboardInterrupt
    return last
