"""Orbax checkpoints of the train state and the Grain iterator, saved asynchronously every N steps (and at the
end and on SIGTERM), keeping the last K; `restore_latest` resumes a restarted run exactly where it stopped.

Faults are user errors (`CheckpointError`) naming the path: a checkpoint directory that cannot be written
(`check_writable`, before training), a full disk at any save (also an asynchronous one, reported when it is
waited for), a checkpoint written by a different model (shapes compared with the checkpoint's metadata before
anything is read). A checkpoint that cannot be read (truncated or garbage files) is moved aside to
`<step>.damaged` with a warning and the previous one is used.

The run's record `<workdir>/config.json` (the resolved config, sorted keys, plus `_provenance`: align-jax's git
commit and the library versions) is written when a run starts; a restart compares its config with it
(`check_resumed_config`) and refuses to mix two experiments in one workdir.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import platform

import grain
import jax
import orbax.checkpoint as ocp

from align_jax.errors import UserError
from align_jax.hostinfo import host_record

log = logging.getLogger(__name__)

# Keys a restarted run may change (the user passes them explicitly): they change how long the run goes, what it
# logs and where it reads cached data, not what the checkpointed state means.
SAFE_TO_CHANGE = ("total_steps", "num_epochs", "log_every", "eval_every", "eval_batches", "eval_generation",
                  "eval_suites", "eval_suites_max_prompts", "eval_suites_max_new_tokens", "eval_batch_size", "model.scan_layers",
                  "progress_bar", "export", "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
                  "data.data_dir", "data.toy_dir", "mesh.data", "mesh.fsdp", "mesh.tensor", "model.attention")
FREE_FORM = ("loss.kwargs.", "rewards.kwargs.")  # option dicts: a key present on one side only is a change
PROVENANCE = "_provenance"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that cannot be written or read, a full disk, or a checkpoint of another model."""


def _os_error(e: BaseException | None) -> BaseException | None:
    """The OS error in `e` or what it chains: an OSError, or TensorStore's "... [os_error_code='N']"."""
    while e is not None:
        if isinstance(e, OSError) or "os_error_code=" in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _no_space(e: BaseException | None) -> bool:
    e = _os_error(e)
    return e is not None and (getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
                              or f"os_error_code='{errno.ENOSPC}'" in str(e))


def _write_error(directory: str, e: BaseException, what: str) -> CheckpointError | None:
    """The user's side of a failed save (a full disk, a file system error), or None (then it is a bug)."""
    if _no_space(e):
        return CheckpointError(f"{what}: no space left on {directory}; free some space there (or use a --workdir on "
                               f"a larger disk) and run the same command again (a run resumes from its last complete "
                               f"checkpoint)")
    cause = _os_error(e)
    if cause is None:
        return None
    return CheckpointError(f"{what}: cannot write to {directory} ({type(cause).__name__}: {cause}); make it a "
                           f"writable directory, or use another --workdir")


def check_writable(directory: str) -> None:
    """Creates `directory` and writes + removes a probe file in it; CheckpointError with the path and the OS
    error otherwise (a file of that name, a read-only directory, a full disk)."""
    probe = os.path.join(directory, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(probe)
        if _no_space(e):
            raise _write_error(directory, e, "cannot start") from None
        raise CheckpointError(f"checkpoints cannot be written to {directory}: {e.strerror} ({e.filename}); it must "
                              f"be a writable directory: remove or rename what is in the way, fix its permissions, "
                              f"or use another --workdir") from None


def step_dirs(directory: str) -> list[int]:
    """The steps of the finalized checkpoints in `directory` (Orbax names them by step; temporary ones are
    `<step>.orbax-checkpoint-tmp-*`), sorted; [] when there is none."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaves(tree) -> dict:
    """{"params/layers/0/attn/q": (shape, dtype)} of a state tree or of its checkpoint metadata."""
    return {"/".join(_key(k) for k in path).removesuffix("/value"): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
    def __init__(self, directory: str, cfg):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})
        self._last_saved = self.manager.latest_step()

    def save(self, step: int, state, data_iter, *, force: bool = False) -> None:
        if self._last_saved == step:
            return
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=grain.checkpoint.CheckpointSave(data_iter)),
                              force=force)
        except Exception as e:  # noqa: BLE001 — also a failed earlier async save, re-raised here
            raise (_write_error(self.directory, e, f"saving the checkpoint of step {step}") or e) from e
        self._last_saved = step

    def _check_shapes(self, step: int, metadata, state) -> None:
        """CheckpointError naming the first entry whose shape/dtype differs between checkpoint and `state`."""
        saved, want = _leaves(metadata), _leaves(state)
        paths = sorted(want, key=lambda p: (not p.startswith("params/"), p)) + sorted(set(saved) - set(want))
        diffs = [p for p in paths if saved.get(p) != want.get(p)]
        if not diffs:
            return
        p = diffs[0]
        fmt = lambda s: "absent" if s is None else f"shape {s[0]} {s[1]}"  # noqa: E731
        raise CheckpointError(
            f"checkpoint {os.path.join(self.directory, str(step))} was written by a different model: "
            f"{p} has {fmt(saved.get(p))} there but {fmt(want.get(p))} in this run ({len(diffs)} entries differ). "
            f"The config changed (model.init_from, or <workdir>/config.json edited or removed): run with the config "
            f"that wrote the checkpoint, or use a new --workdir")

    def _data_state_from_other_process_count(self, step: int) -> dict | None:
        """The data iterator's state for this process when checkpoint `step` was saved by another number of
        processes (Grain keeps one `process_<i>-of-<n>.json` per process and finds none for this count), else
        None (Grain restores it). The training stream gives each of n processes its block of every global batch
        (`align_jax.data.pipeline._batch_block`), so every process is at the same local index, steps x
        batch_size / n: the same place of the global stream is index x m / n on n processes. CheckpointError when
        the saved state is not such a position (e.g. packed SFT rows), rather than resuming elsewhere."""
        directory = os.path.join(self.directory, str(step), "data")
        i, n = jax.process_index(), jax.process_count()
        try:
            files = [f for f in os.listdir(directory) if f.startswith("process_") and f.endswith(".json")]
            if not files or f"process_{i}-of-{n}.json" in files:
                return None
            m = int(files[0].removesuffix(".json").rpartition("-of-")[2])
            if m == n:
                return None  # same process count, this process's file missing: Grain's restore reports the damage
            states = []
            for f in files:
                with open(os.path.join(directory, f)) as fh:
                    states.append(json.load(fh))
        except (OSError, ValueError):
            return None  # unreadable: Grain's restore reports it (a damaged checkpoint)
        index = states[0].get("next_index") if isinstance(states[0], dict) else None
        if (not isinstance(index, int) or set(states[0]) != {"next_index"} or len(files) != m
                or any(s != states[0] for s in states) or index * m % n):
            raise CheckpointError(
                f"checkpoint {os.path.join(self.directory, str(step))} was saved by {m} processes and its data "
                f"iterator's position cannot be carried over to {n} processes; resume this run with {m} processes "
                f"(the mesh may change), or use a new --workdir")
        log.info("checkpoint %d was saved by %d processes: data iterator moved to this run's %d", step, m, n)
        return {"next_index": index * m // n}

    def restore_latest(self, state, data_iter):
        """(state, step) from the latest readable checkpoint, restored straight into `state`'s shardings, with the
        data iterator moved to where it was; None when there is no checkpoint. A checkpoint that cannot be read is
        moved aside (`<step>.damaged`, with a warning) and the one before it is used; CheckpointError when none is
        readable, or when the checkpoint holds another model's shapes."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        damaged = []
        for step in steps:
            path = os.path.join(self.directory, str(step))
            try:
                metadata, error = self.manager.item_metadata(step)["state"], None
            except Exception as e:  # noqa: BLE001
                metadata, error = None, e
            if metadata is not None:
                self._check_shapes(step, metadata, state)
            if error is None:
                moved = self._data_state_from_other_process_count(step)
                try:
                    if moved is None:
                        restored = self.manager.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract),
                            data=grain.checkpoint.CheckpointRestore(data_iter)))
                    else:
                        restored = self.manager.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract)))
                        data_iter.set_state(moved)
                    break
                except Exception as e:  # noqa: BLE001 — truncated / garbage files: TensorStore, JSON, OS errors
                    error = e
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            log.warning("checkpoint %s cannot be read (%s: %s); %s", path, type(error).__name__, reason,
                        "falling back to the one before it" if step != steps[-1] else "no older one is left")
            damaged.append(step)
        else:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read (steps {sorted(steps)}: damaged or "
                                  f"incomplete files; see the warnings above): delete {self.directory} to start the "
                                  f"run over, or use a new --workdir")
        if damaged and jax.process_index() == 0:
            for s in damaged:  # out of Orbax's sight (it lists integer names only), kept for inspection
                src = os.path.join(self.directory, str(s))
                dst = src + ".damaged"
                n = 1
                while os.path.exists(dst):
                    dst, n = f"{src}.damaged{n}", n + 1
                os.rename(src, dst)
                log.warning("moved the damaged checkpoint %s to %s; resuming from step %d", src, dst, step)
        if damaged:
            self.manager.reload()
        self._last_saved = step
        log.debug("restored checkpoint %d from %s", step, self.directory)
        return restored["state"], step

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 — an asynchronous save failed
            raise (_write_error(self.directory, e, "saving a checkpoint") or e) from e

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------------------------------------ config.json


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_record(config) -> dict:
    """The resolved config as plain JSON values, plus `_provenance` (git commit, library versions)."""
    record = json.loads(config.to_json_best_effort(sort_keys=True))
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "grain", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    record[PROVENANCE] = {"align_jax_commit": _git_commit(), "python": platform.python_version(),
                          "versions": versions, "host": host_record()}
    return record


def _git_commit() -> str | None:
    """align-jax's checkout commit, read from .git without running git (None when not a git checkout)."""
    git = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".git")
    try:
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if os.path.exists(os.path.join(git, ref)):
            with open(os.path.join(git, ref)) as f:
                return f.read().strip()
        with open(os.path.join(git, "packed-refs")) as f:
            return next((line.split()[0] for line in f if line.rstrip().endswith(" " + ref)), None)
    except OSError:
        return None


def read_config_record(workdir: str) -> dict | None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); it records the config of the run in this workdir: "
                              f"restore it, or use a new --workdir") from None


def write_config_record(workdir: str, record: dict) -> None:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def check_resumed_config(saved: dict, new: dict, workdir: str, step: int) -> list[str]:
    """Compares a restarted run's config record with the saved one. Returns the changed keys that are safe to
    change on resume ("key: old -> new"); CheckpointError listing every other difference."""
    a = _flat({k: v for k, v in saved.items() if k != PROVENANCE})
    b = _flat({k: v for k, v in new.items() if k != PROVENANCE})
    # A key that only one side has is a change inside the free-form option dicts; elsewhere it is a key that
    # align-jax added or removed between versions, which the run did not set.
    keys = sorted(k for k in set(a) | set(b) if (k in a and k in b) or k.startswith(FREE_FORM))
    diffs = [k for k in keys if a.get(k, "(not set)") != b.get(k, "(not set)")]
    show = lambda v: v if v == "(not set)" else json.dumps(v)  # noqa: E731
    lines = [f"{k}: {show(a.get(k, '(not set)'))} -> {show(b.get(k, '(not set)'))}" for k in diffs]
    unsafe = [line for k, line in zip(diffs, lines) if k not in SAFE_TO_CHANGE]
    if "data_fingerprint" in diffs:
        unsafe.append("(data_fingerprint is the training data's content and path: the data file(s) changed, or "
                      "moved, since the run started)")
    if unsafe:
        raise CheckpointError(
            f"{workdir} holds a run (checkpoint of step {step}) started with another config; resuming it would mix "
            f"two experiments. Differences from {os.path.join(workdir, 'config.json')} (saved -> now):\n  "
            + "\n  ".join(unsafe) + "\nRestore these values to resume that run, or use a new --workdir for a new "
            f"one. (Keys that may change on resume: {', '.join(SAFE_TO_CHANGE)}.)")
    return lines
