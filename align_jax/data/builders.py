"""TFDS builder for local JSON / JSONL / Parquet / Arrow data and Hugging Face datasets saved on disk, without
TensorFlow (and without the ``datasets`` library: tables are read with pyarrow).

``build_dataset(paths, kind=..., data_dir=...)`` parses the files (``align_jax.data.formats``), validates every
record and writes a TFDS dataset in the ``array_record`` file format, one split per entry of ``paths``
(a path or list of paths is the ``"train"`` split). A path is a file (``.json``, ``.jsonl``, ``.gz``,
``.parquet``, ``.arrow``), a glob, or a directory written by ``datasets``' ``save_to_disk``:
``Dataset.save_to_disk(dir)`` (``state.json`` lists its ``data-0000i-of-0000n.arrow`` files) or
``DatasetDict.save_to_disk(dir)`` (``dataset_dict.json`` + one sub-directory per split; ``dir`` reads its
``"train"`` split, ``dir:test`` another one). Records of tables are named ``"file.arrow:row n"`` in errors.
TFDS's own progress bars and "Downloading and preparing dataset ..." lines are silenced; the module logger says
"building dataset from <files> -> <dir>" instead. Reading it back needs no TensorFlow either:
``builder.as_data_source(split)`` (or ``load_source(dataset_dir, split)``) is a random-access data source that
Grain reads (``align_jax.data.pipeline``). Examples keep the input file order (``disable_shuffling``).

How this works without TensorFlow (tensorflow-datasets 4.9.10): a ``tfds.core.GeneratorBasedBuilder`` whose
``_info`` returns a plain ``tfds.core.DatasetInfo`` (``dataset_info_from_configs`` wants a package metadata
directory), built with ``file_format="array_record"``; ``download_and_prepare()`` then serializes with TFDS's
own protobuf example writer, and ``as_data_source()`` decodes with numpy.

Caching: the builder config name is ``{kind}-{fingerprint}`` where the fingerprint hashes the kind, the paths and
contents of the data files (for a ``save_to_disk`` directory: its ``.arrow`` files) and the parser options, so the
dataset lives in ``data_dir/align_jax_data/{kind}-{fp}/1.0.0`` and is rebuilt exactly when the input changes. The
skip statistics of the build are stored in the dataset's metadata, so a cached dataset reports them again -- and,
with ``on_bad_example="raise"``, a dataset that was built with skipped examples raises on reuse. Build on one
process (e.g. ``jax.process_index() == 0``) when ``data_dir`` is shared. (``pipeline.make_loader`` stores its
tokenizer-dependent validation pass in the same directory: ``tokenize_check-{split}-{hash}.json``.)

Stored features (see ``formats`` for their meaning): every kind has ``source`` (``"path:line"`` or
``"path:row n"``) and ``conversational`` (int32 0/1; conversational values are JSON-encoded message lists);
pairwise: ``prompt, chosen, rejected`` (text), ``chosen_prob`` (float32);
groupwise: ``prompt`` (text), ``responses`` (sequence of text), ``ranks`` (int32[K]), ``scores`` (float32[K]);
sft: ``prompt, completion`` (text; ``prompt`` is "" for the messages / text forms);
prompt_only: ``prompt``, ``extra`` (JSON object of the other fields).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from align_jax.data import formats
from align_jax.data.formats import DataError, SkipLog

logger = logging.getLogger(__name__)

_FORMAT_VERSION = "2"  # bump when the parsing of a record changes (part of the fingerprint)


@dataclasses.dataclass
class BuildStats:
    """What a build produced: examples per split, and the bad examples skipped (count + first reasons)."""

    num_examples: dict[str, int]
    num_skipped: int
    skipped_reasons: list[str]


def features(kind: str) -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    common = {"source": text(), "conversational": np.int32}
    per_kind = {
        "pairwise": {"prompt": text(), "chosen": text(), "rejected": text(), "chosen_prob": np.float32},
        "groupwise": {
            "prompt": text(),
            "responses": tfds.features.Sequence(text()),
            "ranks": tfds.features.Sequence(np.int32),
            "scores": tfds.features.Sequence(np.float32),
        },
        "sft": {"prompt": text(), "completion": text()},
        "prompt_only": {"prompt": text(), "extra": text()},
    }
    if kind not in per_kind:
        raise ValueError(f"kind must be one of {formats.KINDS}, got {kind!r}")
    return tfds.features.FeaturesDict({**common, **per_kind[kind]})


def _fingerprint(kind: str, split_files: Mapping[str, Sequence[str]], options: str) -> str:
    h = hashlib.sha256(f"{_FORMAT_VERSION}|{kind}|{options}".encode())
    for split in sorted(split_files):
        h.update(f"|split={split}".encode())
        for path in split_files[split]:
            h.update(f"|{path}|".encode())  # the path is part of each example's `source`
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


class AlignJaxData(tfds.core.GeneratorBasedBuilder):
    """Generic builder: ``split_files`` maps split name -> files; ``parse`` turns one JSON value into a record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "align-jax preference / SFT / prompt data."}
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for a checksums file next to the builder's code; its lookup imports `importlib_resources`,
        # which this stack does not install (etils only needs it on old Pythons). There is nothing to download,
        # so there is no checksums file: report no code path.
        return None

    # TFDS prints (termcolor, always) "Downloading and preparing dataset ..." and "Dataset ... downloaded and
    # prepared to ..." from these two methods; nothing is downloaded here: `build` logs one line instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def __init__(
        self,
        *,
        kind: str,
        split_files: Mapping[str, Sequence[str]],
        data_dir: str,
        parse: Callable[[object], dict] | None = None,
        options: str = "",
        on_bad_example: str = "raise",
    ):
        self._kind = kind
        self._split_files = {k: list(v) for k, v in split_files.items()}
        self._parse = parse or formats.PARSERS[kind]
        self._skip_log = SkipLog(on_bad_example)
        name = f"{kind}-{_fingerprint(kind, self._split_files, options)}"
        with _quiet_tfds():
            super().__init__(
                data_dir=data_dir, config=tfds.core.BuilderConfig(name=name), file_format="array_record"
            )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"align-jax {self._kind} data from {self._split_files}",
            features=features(self._kind),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep the input order: example i is the i-th valid input record
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(files) for split, files in self._split_files.items()}

    def _generate_examples(self, files):
        index = 0  # integer keys in generation order (the order TFDS keeps with disable_shuffling)
        for path in files:
            for example in formats.read_examples(path, self._kind, self._skip_log, self._parse):
                yield index, example
                index += 1
        # Runs before TFDS writes the dataset info, so the stats land in metadata.json.
        self.info.metadata["num_skipped"] = self._skip_log.num_skipped
        self.info.metadata["skipped_reasons"] = list(self._skip_log.reasons)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Without TFDS's progress bars and its "Using custom data configuration" warning (every config is custom)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    active, tqdm_utils._active = tqdm_utils._active, False
    drop = _DropMessages(("Using custom data configuration",))
    logging.getLogger("absl").addFilter(drop)
    try:
        yield
    finally:
        tqdm_utils._active = active
        logging.getLogger("absl").removeFilter(drop)


def hf_disk_files(path: str, split: str | None = None) -> list[str]:
    """The ``.arrow`` data files of a ``datasets`` ``save_to_disk`` directory, in order.

    A ``DatasetDict`` directory reads ``split`` (default ``"train"``); a ``Dataset`` directory has one split.
    """
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        split = split or "train"
        if split not in splits:
            raise DataError(
                f"{path}: this DatasetDict has no split {split!r} (splits: {', '.join(splits)}); "
                f"select one as '{path}:<split>'"
            )
        return hf_disk_files(os.path.join(path, split))
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        if split:
            raise DataError(f"{path}: a Dataset directory has no splits; drop ':{split}'")
        with open(state) as f:
            files = [os.path.join(path, d["filename"]) for d in json.load(f).get("_data_files", [])]
        missing = [f for f in files if not os.path.isfile(f)]
        if not files or missing:
            raise DataError(f"{state}: data files missing ({missing or 'none listed'}); save the dataset again")
        return files
    raise DataError(
        f"{path}: a directory, but not a Hugging Face dataset saved with save_to_disk (no dataset_dict.json or "
        "state.json); pass its data files (.json, .jsonl, .parquet, .arrow) or a glob"
    )


def _expand(paths: str | Sequence[str]) -> list[str]:
    """Paths, globs, ``save_to_disk`` directories and ``dir:split`` -> the data files, in order."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = []
    for p in map(str, paths):
        head, _, split = p.rpartition(":")
        if not os.path.exists(p) and head and os.path.isdir(head):  # "dir:split" of a DatasetDict
            out.extend(hf_disk_files(head, split))
            continue
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"no input file(s) for {p!r}")
        for m in matches:
            out.extend(hf_disk_files(m) if os.path.isdir(m) else [m])
    return out


def build(builder: AlignJaxData, on_bad_example: str) -> tuple[AlignJaxData, BuildStats]:
    """``download_and_prepare`` (no-op when cached) and the build statistics."""
    if not os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json")):  # not built yet
        files = sorted({f for fs in builder._split_files.values() for f in fs})
        logger.info("building dataset from %s -> %s", ", ".join(files), builder.data_dir)
    with _quiet_tfds():
        builder.download_and_prepare()
    meta = builder.info.metadata or {}
    stats = BuildStats(
        num_examples={name: split.num_examples for name, split in builder.info.splits.items()},
        num_skipped=int(meta.get("num_skipped", 0)),
        skipped_reasons=list(meta.get("skipped_reasons", [])),
    )
    if stats.num_skipped:
        if on_bad_example == "raise":
            raise DataError(
                f"{stats.skipped_reasons[0]} (cached dataset {builder.data_dir} was built with "
                f"on_bad_example='skip' and skipped {stats.num_skipped} examples)"
            )
        logger.warning(
            "%s: skipped %d bad examples; first: %s", builder.data_dir, stats.num_skipped, stats.skipped_reasons
        )
    return builder, stats


def build_dataset(
    path_or_paths: str | Sequence[str] | Mapping[str, str | Sequence[str]],
    *,
    kind: str,
    data_dir: str,
    on_bad_example: str = "raise",
) -> tuple[AlignJaxData, BuildStats]:
    """Builds (or reuses) the TFDS dataset of local files; returns ``(builder, stats)``.

    ``path_or_paths``: a path, a glob, a list of them (all the ``"train"`` split), or ``{split: paths}``; a path
    is a JSON / JSONL (``.gz``) / ``.parquet`` / ``.arrow`` file or a ``save_to_disk`` directory (``dir:split``
    selects a split of a ``DatasetDict``, default ``"train"``).
    Read it with ``builder.as_data_source(split)``. Bad records raise ``DataError("path:line: reason")``, or are
    skipped and counted with ``on_bad_example="skip"`` (``stats.num_skipped``, ``stats.skipped_reasons``).
    """
    if kind not in formats.KINDS:
        raise ValueError(f"kind must be one of {formats.KINDS}, got {kind!r}")
    SkipLog(on_bad_example)  # validates the option
    if isinstance(path_or_paths, Mapping):
        split_files = {split: _expand(p) for split, p in path_or_paths.items()}
    else:
        split_files = {"train": _expand(path_or_paths)}
    make = lambda: AlignJaxData(kind=kind, split_files=split_files, data_dir=data_dir,  # noqa: E731
                                on_bad_example=on_bad_example)
    builder = make()
    try:
        return build(builder, on_bad_example)
    except FileExistsError:
        # Another process built the same dataset at the same time (e.g. two runs of an experiment sharing its
        # data_dir): the directory is named by the content fingerprint, so its finished build is this one.
        if not os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json")):
            raise
        logger.info("%s was built by another process meanwhile: using it", builder.data_dir)
        return build(make(), on_bad_example)


def load_source(dataset_dir: str, split: str = "train"):
    """Random-access data source of an already built dataset directory (``.../{kind}-{fp}/1.0.0``)."""
    return tfds.builder_from_directory(dataset_dir).as_data_source(split)
