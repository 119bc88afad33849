"""Data pipelines for align-jax.

Preference / SFT / prompt-only data (JSON / JSONL, Parquet, Arrow, or a Hugging Face ``save_to_disk`` directory)
is converted once into a TFDS dataset (array_record files, no TensorFlow), read back as a random-access data
source, checked once against the tokenizer and fed to training by a Grain pipeline:

    from align_jax.data import build_dataset, make_loader
    builder, stats = build_dataset("prefs.jsonl", kind="pairwise", data_dir="/tmp/tfds")
    loader, skips = make_loader(builder.as_data_source("train"), tokenizer, kind="pairwise",
                                batch_size=8, seed=0, max_length=512)
    it = iter(loader)            # checkpointable: it.get_state() / it.set_state(state)
    batch = next(it)             # dict of numpy arrays (see align_jax.data.pipeline)

``stats.num_skipped`` counts the records refused while parsing, ``skips.num_skipped`` those refused at
tokenization (``skips.num_truncated``: legal examples cut to ``max_length``); each bad record is counted once.

Modules: ``formats`` (raw JSON/JSONL/Parquet/Arrow parsing and validation, ``DataError``), ``builders`` (TFDS builder),
``hh_rlhf`` (Anthropic HH-RLHF files), ``tokenize`` (TRL-style tokenization), ``pipeline`` (Grain loader).
The toy task lives in ``align_jax.data.toy`` and is not imported here.
"""

import importlib

# Lazy exports, so that importing a light submodule (e.g. align_jax.data.toy) does not import TFDS / Grain.
_EXPORTS = {
    "DataError": "align_jax.data.formats",
    "BuildStats": "align_jax.data.builders",
    "build_dataset": "align_jax.data.builders",
    "load_source": "align_jax.data.builders",
    "build_hh_rlhf": "align_jax.data.hh_rlhf",
    "TokenizeConfig": "align_jax.data.tokenize",
    "make_loader": "align_jax.data.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'align_jax.data' has no attribute {name!r}")
