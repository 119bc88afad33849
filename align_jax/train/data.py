"""The run's data from its config: TFDS datasets built from `data.train` / `data.eval` ('toy:<name>', 'hh:<dir>',
JSON/JSONL/parquet/arrow files or a Hugging Face save_to_disk directory) and the Grain loaders over them; and
the config a run actually uses once the data is known (`num_epochs` -> `total_steps`)."""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
from typing import Callable

import jax

from align_jax.errors import SetupError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
    kind: str
    train: object  # grain IterDataset of batches (infinite)
    eval: Callable | None  # () -> a fresh one-epoch eval IterDataset
    skips: object
    train_source: object = None
    loader_kw: dict = dataclasses.field(default_factory=dict)
    parse_skipped: int = 0  # bad records skipped while building the TFDS dataset (before tokenization)
    train_fingerprint: str = ""  # the built training dataset (its content hash): a restart must train on the same
    data_dir: str = ""  # where the TFDS datasets are built (and precomputed reference log-probs are kept)

    @property
    def num_skipped(self) -> int:
        """Every skipped training example, counted once: at parse time plus at tokenization."""
        return self.parse_skipped + (self.skips.num_skipped if self.skips is not None else 0)

    @property
    def num_train_examples(self) -> int:
        """Usable training examples (records of the source minus those skipped at tokenization)."""
        return len(self.train_source) - (self.skips.num_skipped if self.skips is not None else 0)


def _resolve_files(spec: str, workdir: str, config, key: str):
    """'toy:<name>' | 'hh:<dir>' | paths/globs (comma-separated) -> ('files', [paths]) or ('hh', dir)."""
    if spec.startswith("toy:"):
        from align_jax.data.toy import generate

        out = config.data.toy_dir or os.path.join(workdir, "toy_data")
        name = spec[4:]
        path = os.path.join(out, f"{name}.jsonl")
        if not os.path.exists(path):
            files = generate(out, seed=config.data.toy_seed)
            if name not in {k for k in files}:
                raise SetupError(f"config.data.{key}={spec!r}: the toy task has no file {name!r}; "
                                 f"it has {sorted(files)}")
        return "files", [path]
    if spec.startswith("hh:"):
        return "hh", spec[3:]
    paths = []
    for part in spec.split(","):
        part = part.strip()
        found = sorted(glob.glob(part))
        base, _, split = part.rpartition(":")
        if not found and base and os.path.isdir(base) and split.isidentifier():
            found = [part]  # "<save_to_disk dir>:<split>" of a Hugging Face DatasetDict
        if not found:
            raise SetupError(f"config.data.{key}: no file matches {part!r} (expected JSON/JSONL files, parquet or "
                             f"arrow files, a Hugging Face save_to_disk directory [':<split>'], or toy:<name>)")
        paths += found
    return "files", paths


def _build(spec: str, kind: str, workdir: str, config, key: str, split: str):
    """`_build_here` on process 0 first, then on the others (which find its files when `data_dir` is shared): two
    processes never write the same toy files or TFDS directory at once."""
    if jax.process_count() == 1:
        return _build_here(spec, kind, workdir, config, key, split)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        try:
            return _build_here(spec, kind, workdir, config, key, split)
        finally:
            multihost_utils.sync_global_devices(f"align_jax data {key} built")
    multihost_utils.sync_global_devices(f"align_jax data {key} built")
    return _build_here(spec, kind, workdir, config, key, split)


def _build_here(spec: str, kind: str, workdir: str, config, key: str, split: str):
    from align_jax.data import build_dataset
    from align_jax.data.hh_rlhf import build_hh_rlhf

    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    how, what = _resolve_files(spec, workdir, config, key)
    if how == "hh":
        builder, stats = build_hh_rlhf(what, data_dir=data_dir, on_bad_example=config.data.on_bad_example,
                                       splits=(split,))
        source = builder.as_data_source(split)
    else:
        builder, stats = build_dataset(what, kind=kind, data_dir=data_dir, on_bad_example=config.data.on_bad_example)
        source = builder.as_data_source("train")
    # The built dataset's directory under data_dir names its content fingerprint (files, contents, parser version).
    return source, stats, os.path.relpath(str(builder.data_dir), data_dir)


def packing_enabled(config, algorithm, kind: str) -> bool:
    """`data.packing`; None (the default) = on for preference data (pairwise / groupwise) where the algorithm
    supports it, off for SFT (TRL's default) and prompts."""
    if config.data.packing is None:
        return algorithm.supports_packing and kind in ("pairwise", "groupwise")
    return bool(config.data.packing)


def make_data(config, workdir: str, tokenizer, algorithm) -> Data:
    from align_jax.data import make_loader

    kind = config.data.kind or algorithm.data_kind
    train_source, stats, fingerprint = _build(config.data.train, kind, workdir, config, "train", "train")
    kw = dict(kind=kind, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length or None,
              truncation_mode=config.data.truncation_mode, length_buckets=tuple(config.data.length_buckets),
              group_size=config.data.group_size or None, on_bad_example=config.data.on_bad_example)
    accum = config.optimizer.grad_accum_steps
    train, skips = make_loader(train_source, tokenizer, batch_size=config.batch_size // jax.process_count(),
                               seed=config.seed, shuffle=config.data.shuffle, num_epochs=None,
                               packing=packing_enabled(config, algorithm, kind), micro_batches=accum,
                               row_multiple=accum * jax.local_device_count(),
                               packing_length=config.data.get("packing_length", 0) or None, drop_remainder=True,
                               prefetch=2, **kw)
    eval_fn = None
    if config.data.eval:
        eval_source, _, _ = _build(config.data.eval, kind, workdir, config, "eval", "test")

        def eval_fn():
            ds, _ = make_loader(eval_source, tokenizer, batch_size=config.eval_batch_size // jax.process_count(),
                                seed=0, shuffle=False, num_epochs=1, packing=False, drop_remainder=False, **kw)
            return ds

    return Data(kind, train, eval_fn, skips, train_source, kw, parse_skipped=stats.num_skipped,
                train_fingerprint=fingerprint, data_dir=config.data.data_dir or os.path.join(workdir, "tfds"))


def resolve_config(config, data: Data, algorithm):
    """The config a run actually uses: `num_epochs` > 0 turns into `total_steps` = ceil(num_epochs x usable
    training examples / batch_size). Returns a new (unlocked) ConfigDict; `config` is not changed."""
    config = config.copy_and_resolve_references()
    if config.get("num_epochs", 0) and config.num_epochs > 0:
        n = data.num_train_examples
        config.total_steps = max(1, math.ceil(config.num_epochs * n / config.batch_size))
        per_rollout = algorithm.steps_per_rollout(config)
        config.total_steps = math.ceil(config.total_steps / per_rollout) * per_rollout  # whole rollouts
        log.info("num_epochs=%g over %d examples at batch %d: total_steps=%d", config.num_epochs, n,
                 config.batch_size, config.total_steps)
    return config
