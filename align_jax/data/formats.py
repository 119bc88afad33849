"""Raw data formats: reading JSON / JSONL / Parquet / Arrow files and validating each record into a normalized
example.

Input files are a JSON array of objects (``[{...}, {...}]``) or JSON Lines (one object per line); a ``.gz``
suffix means gzip. The format is sniffed: a file whose first non-blank character is ``[`` is an array, anything
else is read as JSONL (so ``.json`` files holding JSONL work too). Blank lines in JSONL are ignored. An object
with a duplicate key (``{"prompt": "a", "prompt": "b"}``) is a bad record.

Tables: ``.parquet`` files and ``.arrow`` files (Arrow IPC, stream or file format -- the data files of a Hugging
Face ``save_to_disk`` directory, see ``builders``) are read with pyarrow, one record per row (a null value is an
absent field, as Arrow has no "absent"). Rows go through the same parsers as JSON records; their ``source`` is
``"path:row n"`` (0-based, as ``dataset[n]``).

Record formats, by ``kind`` (field names as in TRL; conversational values are lists of
``{"role": str, "content": str}`` messages, rendered later with the tokenizer's chat template):

* ``pairwise``   ``{"prompt", "chosen", "rejected"}`` with an optional ``"chosen_prob"`` in [0, 1] (soft label:
  the probability that ``chosen`` is preferred; 1.0 when absent). Without ``"prompt"`` (implicit prompt) the
  prompt is the longest common prefix of ``chosen`` and ``rejected``, exactly as TRL's ``extract_prompt``
  (string prefix for text, message prefix for conversations). As TRL's ``maybe_extract_prompt``, a text prompt
  next to conversational ``chosen``/``rejected`` (or the reverse) is ignored and the prompt is extracted.
* ``groupwise``  ``{"prompt", "responses": [...K], "ranks": [...K]}`` and/or ``"scores": [...K]``, K >= 2.
  Ranks: lower is better, 0 = best; ints in [0, K-1] forming a dense (0,1,1,2) or competition (0,1,1,3) ranking.
  Scores: finite numbers, higher is better. Only scores: ranks = competition ranks of the descending scores
  (``rank_i = #{j: s_j > s_i}``). Only ranks: ``scores = -ranks``.
* ``sft``        ``{"messages": [...]}`` or ``{"prompt", "completion"}`` or ``{"text"}`` (first match wins).
* ``prompt_only`` ``{"prompt"}``; other fields are kept as ``extra`` (e.g. the answer a reward function needs).

Messages: ``role`` is one of ``ROLES`` (system, user, assistant, tool); the completions of pairwise and
groupwise data (``chosen``, ``rejected``, ``responses``) are assistant messages only. A pair whose ``chosen`` and
``rejected`` are identical (after prompt extraction, ignoring surrounding whitespace) is a bad record, and so are
groupwise ``scores`` that do not fit in float32 (they are stored as float32).

Normalized example (what the TFDS builder stores). Strings are stored as text; a conversational value is stored as
its JSON encoding and ``conversational`` is 1. ``source`` is ``"path:line"`` (``"path:row n"`` for tables) so later
errors can name the record.

Bad input (malformed JSON, invalid UTF-8, non-object record, missing/empty/non-string field, bad ranks, ...)
raises ``DataError("path:line: reason")``. With ``on_bad_example="skip"`` the record is skipped and counted in a
``SkipLog`` (count + first reasons, logged). Syntax or encoding errors inside a JSON *array* file cannot be
localized to one element, so they always raise. A file without any record raises
``DataError("path: no examples: ...")`` and one whose records are all bad ``DataError("no usable example in
path: ...")``, in both modes.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from align_jax.errors import UserError

logger = logging.getLogger(__name__)

KINDS = ("pairwise", "groupwise", "sft", "prompt_only")
ON_BAD_EXAMPLE = ("raise", "skip")
ROLES = ("system", "user", "assistant", "tool")  # message roles a chat template is expected to know
MAX_REASONS = 10  # reasons kept (and logged one by one) per SkipLog
MAX_TRUNCATED = 5  # sources of truncated examples kept per SkipLog
FLOAT32_MAX = float(np.finfo(np.float32).max)
TABLE_SUFFIXES = (".parquet", ".arrow")  # read with pyarrow, one record per row


class DataError(UserError, ValueError):
    """A bad input example; the message starts with ``path:line:``."""


class InvalidRecord(ValueError):
    """Raised by the ``parse_*`` functions; the caller prefixes it with ``path:line``."""


@dataclasses.dataclass
class SkipLog:
    """Counts skipped bad examples and keeps the first ``MAX_REASONS`` reasons (each also logged).

    ``num_truncated`` / ``truncated_sources`` (the first ``MAX_TRUNCATED``): examples that were legal but lost
    tokens to ``max_length`` / ``max_prompt_length`` (set by ``pipeline.make_loader``).
    """

    on_bad_example: str = "raise"
    num_skipped: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    num_truncated: int = 0
    truncated_sources: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.on_bad_example not in ON_BAD_EXAMPLE:
            raise ValueError(f"on_bad_example must be one of {ON_BAD_EXAMPLE}, got {self.on_bad_example!r}")

    def bad(self, message: str) -> None:
        """Raises ``DataError(message)`` in raise mode; counts and logs it in skip mode."""
        if self.on_bad_example == "raise":
            raise DataError(message)
        self.num_skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(message)
            logger.warning("skipping bad example: %s", message)


# ----------------------------------------------------------------------------------------------- file reading


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    return data


class _Decoder(json.JSONDecoder):
    """``json.JSONDecoder`` that notes the duplicate keys of the objects it decodes (``object_pairs_hook``)."""

    def __init__(self):
        super().__init__(object_pairs_hook=self._object)
        self.duplicates: list[str] = []

    def _object(self, pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            self.duplicates += [k for k, _ in pairs if k in seen or seen.add(k)]
        return obj

    def checked(self, value: Any, where: str) -> Any:
        """``value``, or a ``DataError`` when the objects just decoded had a duplicate key (then reset)."""
        if not self.duplicates:
            return value
        key, self.duplicates = self.duplicates[0], []
        return DataError(f"{where}: duplicate key {key!r} in a JSON object; keep one value per key")


def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yields ``(line_number, value)`` per record of a JSONL or JSON-array file (1-based line numbers).

    A JSONL line that is not valid UTF-8 or not valid JSON, or a record with a duplicate key, yields
    ``(line, DataError)`` instead of a value, so the caller may skip it. For a JSON array the line is that of the
    element's first character; a syntax or encoding error in an array raises ``DataError`` directly.
    """
    data = _read_bytes(path)
    if data.lstrip()[:1] == b"[":
        yield from _iter_json_array(path, data)
        return
    decoder = _Decoder()
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, DataError(f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line")
            continue
        try:
            value = decoder.decode(text)
        except json.JSONDecodeError as e:
            decoder.duplicates = []
            yield line_no, DataError(f"{path}:{line_no}: malformed JSON: {e.msg} (column {e.colno})")
            continue
        yield line_no, decoder.checked(value, f"{path}:{line_no}")


def _iter_json_array(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    decoder = _Decoder()
    pos = text.index("[") + 1
    line, line_pos = 1, 0  # line number of offset line_pos (counted incrementally)

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_of(p: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, p)
        line_pos = p
        return line

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        line = line_of(pos)
        yield line, decoder.checked(value, f"{path}:{line}")
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                raise DataError(f"{path}:{line_of(pos)}: unexpected data after the JSON array")
            return
        raise DataError(f"{path}:{line_of(min(pos, len(text)))}: malformed JSON array: expected ',' or ']'")


def is_table_file(path: str) -> bool:
    return str(path).endswith(TABLE_SUFFIXES)


def _drop_nulls(value: Any) -> Any:
    """Arrow has no absent field: a null struct field / column is dropped, as if absent from a JSON object."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def iter_table_rows(path: str, batch_size: int = 1024) -> Iterator[tuple[int, dict]]:
    """Yields ``(row, record)`` per row of a ``.parquet`` or ``.arrow`` (IPC stream or file) file, rows 0-based."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if str(path).endswith(".parquet"):
            batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size)
        else:
            with open(path, "rb") as f:
                is_file_format = f.read(6) == b"ARROW1"
            source = pa.memory_map(str(path))
            if is_file_format:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = pa.ipc.open_stream(source)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield row, _drop_nulls(record)
                row += 1
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if str(path).endswith(".parquet") else "Arrow IPC"
        raise DataError(f"{path}: not a readable {kind} file ({e}); check the file, or rewrite it") from None


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yields ``(source, value)`` per record of a JSON / JSONL / table file; ``source`` is ``path:line`` or
    ``path:row n``; ``value`` may be a ``DataError`` (a record that could not be read)."""
    if is_table_file(path):
        for row, value in iter_table_rows(path):
            yield f"{path}:row {row}", value
    else:
        for line_no, value in iter_json_records(path):
            yield f"{path}:{line_no}", value


def read_examples(path: str, kind: str, skip_log: SkipLog, parse=None) -> Iterator[dict]:
    """Yields normalized examples of ``path`` (each with its ``source``), bad ones via ``skip_log``.

    Raises ``DataError`` when the file has no record at all, or (in skip mode) when every record was bad.
    """
    parse = parse or PARSERS[kind]
    num_records = num_good = 0
    first_bad = None
    for where, value in iter_records(path):
        num_records += 1
        if isinstance(value, DataError):
            message = str(value)
        else:
            try:
                example = parse(value)
            except InvalidRecord as e:
                message = f"{where}: {e}"
            else:
                example["source"] = where
                num_good += 1
                yield example
                continue
        first_bad = first_bad or message
        skip_log.bad(message)
    if not num_records:
        if is_table_file(path):
            what = "the table has no rows"
        elif _read_bytes(path).lstrip()[:1] == b"[":
            what = "the file is an empty JSON array"
        else:
            what = "the file is empty (or only blank lines)"
        raise DataError(f"{path}: no examples: {what}")
    if not num_good:
        raise DataError(
            f"no usable example in {path}: {num_records} records, all bad; first: {first_bad}; "
            f"fix the file, or check that its records have the fields of kind={kind!r}"
        )


# ------------------------------------------------------------------------------------------ field validation


def _field(obj: dict, name: str) -> Any:
    if name not in obj or obj[name] is None:
        raise InvalidRecord(f"missing field {name!r}")
    return obj[name]


def _messages(value: Any, name: str) -> list[dict]:
    """A non-empty list of ``{role, content}`` string messages whose roles are in ``ROLES``."""
    if not value:
        raise InvalidRecord(f"empty field {name!r}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRecord(f"field {name!r}: message {i} is not a {{'role', 'content'}} object")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise InvalidRecord(f"field {name!r}: message {i} has a non-string role or content")
    _check_roles(value, name, ROLES, "an unknown role {!r}", f"use one of {', '.join(ROLES)}")
    return list(value)


def _check_roles(messages: list[dict], name: str, allowed: tuple[str, ...], what: str, fix: str) -> None:
    for i, m in enumerate(messages):
        if m["role"] not in allowed:
            found = ", ".join(dict.fromkeys(m["role"] for m in messages))
            what = what.format(m["role"])
            raise InvalidRecord(f"field {name!r}: message {i} has {what} (roles found: {found}); {fix}")


def _check_completion(value: str | list[dict], name: str) -> None:
    """The completions of preference data are the model's turns: assistant messages only."""
    if not isinstance(value, str):
        fix = "a completion is assistant messages only (earlier turns belong in 'prompt')"
        _check_roles(value, name, ("assistant",), "role {!r}, not 'assistant'", fix)


def is_conversational_value(value: Any) -> bool:
    """TRL's test: a list whose first item is a dict with a ``role`` key."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _text_or_messages(obj: dict, name: str) -> str | list[dict]:
    """A non-empty string or a non-empty list of messages."""
    value = _field(obj, name)
    if isinstance(value, str):
        if not value:
            raise InvalidRecord(f"empty field {name!r}")
        return value
    if isinstance(value, list):
        return _messages(value, name)
    raise InvalidRecord(f"field {name!r} must be a string or a list of messages, got {type(value).__name__}")


def _encode(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def decode_value(text: str, conversational: bool) -> str | list[dict]:
    """Inverse of the storage encoding: the string itself, or the decoded list of messages."""
    return json.loads(text) if conversational else text


def _same_form(values: list) -> bool:
    return len({isinstance(v, str) for v in values}) == 1


def extract_prompt(chosen, rejected):
    """TRL's ``extract_prompt``: longest common prefix (characters or messages) of chosen and rejected.

    Exactly TRL's loop, including its quirks: the character before the divergence point is moved out of the
    prompt when it is a space; when one sequence is a prefix of the other the split is at ``min_len - 1``.
    Returns ``(prompt, chosen, rejected)``.
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


# ------------------------------------------------------------------------------------------------ parsers


def _require_object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _stripped(value: str | list[dict]):
    if isinstance(value, str):
        return value.strip()
    return [(m["role"], m["content"].strip()) for m in value]


def parse_pairwise(obj: Any) -> dict:
    obj = _require_object(obj)
    chosen, rejected = _text_or_messages(obj, "chosen"), _text_or_messages(obj, "rejected")
    if not _same_form([chosen, rejected]):
        raise InvalidRecord("'chosen' and 'rejected' must both be strings or both be message lists")
    prompt = _text_or_messages(obj, "prompt") if "prompt" in obj else None
    if prompt is None or not _same_form([prompt, chosen]):
        if chosen[0] != rejected[0]:
            raise InvalidRecord("implicit prompt: 'chosen' and 'rejected' have no common prefix")
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not prompt:
            raise InvalidRecord("implicit prompt: the extracted prompt is empty")
    _check_completion(chosen, "chosen")
    _check_completion(rejected, "rejected")
    if _stripped(chosen) == _stripped(rejected):
        raise InvalidRecord(
            "'chosen' and 'rejected' are identical (after prompt extraction, ignoring surrounding whitespace): "
            "a preference needs two different responses; fix or drop the record"
        )
    prob = obj.get("chosen_prob", 1.0)
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise InvalidRecord(f"'chosen_prob' must be a number in [0, 1], got {prob!r}")
    return {
        "prompt": _encode(prompt),
        "chosen": _encode(chosen),
        "rejected": _encode(rejected),
        "chosen_prob": float(prob),
        "conversational": int(not isinstance(prompt, str)),
    }


def _int_list(obj: dict, name: str, k: int) -> list[int]:
    value = _field(obj, name)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InvalidRecord(f"{name!r} must be a list of integers")
    if len(value) != k:
        raise InvalidRecord(f"{name!r} has {len(value)} entries but 'responses' has {k}")
    return value


def valid_ranks(ranks: list[int]) -> bool:
    """Dense (0,1,1,2) or competition (0,1,1,3) ranking of K items, 0 = best."""
    k = len(ranks)
    if not all(0 <= r < k for r in ranks):
        return False
    dense = sorted(set(ranks)) == list(range(len(set(ranks))))
    competition = all(r == sum(o < r for o in ranks) for r in ranks)
    return dense or competition


def competition_ranks(scores: list[float]) -> list[int]:
    """``rank_i = #{j: s_j > s_i}`` (higher score = better = lower rank; ties share a rank)."""
    return [sum(o > s for o in scores) for s in scores]


def parse_groupwise(obj: Any) -> dict:
    obj = _require_object(obj)
    prompt = _text_or_messages(obj, "prompt")
    responses = _field(obj, "responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise InvalidRecord("'responses' must be a list of at least 2 responses")
    responses = [_text_or_messages({"responses": r}, "responses") for r in responses]
    if not _same_form([prompt, *responses]):
        raise InvalidRecord("'prompt' and 'responses' must all be strings or all be message lists")
    for i, r in enumerate(responses):
        _check_completion(r, f"responses[{i}]")
    k = len(responses)
    if "ranks" not in obj and "scores" not in obj:
        raise InvalidRecord("missing field 'ranks' (or 'scores')")
    ranks = scores = None
    if "ranks" in obj:
        ranks = _int_list(obj, "ranks", k)
        if not valid_ranks(ranks):
            raise InvalidRecord(f"'ranks' {ranks} is not a ranking of {k} responses (ints in 0..{k - 1}, 0 = best)")
    if "scores" in obj:
        scores = _field(obj, "scores")
        if not isinstance(scores, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores
        ):
            raise InvalidRecord("'scores' must be a list of finite numbers")
        if len(scores) != k:
            raise InvalidRecord(f"'scores' has {len(scores)} entries but 'responses' has {k}")
        for i, s in enumerate(scores):
            if abs(s) > FLOAT32_MAX:
                raise InvalidRecord(
                    f"'scores'[{i}] = {s!r} overflows float32 (largest finite float32: {FLOAT32_MAX:.8g}); "
                    "rescale the scores"
                )
    if ranks is None:
        ranks = competition_ranks(scores)
    if scores is None:
        scores = [-float(r) for r in ranks]
    return {
        "prompt": _encode(prompt),
        "responses": [_encode(r) for r in responses],
        "ranks": [int(r) for r in ranks],
        "scores": [float(s) for s in scores],
        "conversational": int(not isinstance(prompt, str)),
    }


def parse_sft(obj: Any) -> dict:
    """Normalized SFT example: ``prompt`` is "" for the ``messages`` and ``text`` forms.

    ``messages`` is stored as a conversational ``completion`` with an empty prompt (loss on assistant turns);
    ``text`` as a plain ``completion`` with an empty prompt (loss on all tokens).
    """
    obj = _require_object(obj)
    if "messages" in obj:
        value = _field(obj, "messages")
        if not isinstance(value, list):
            raise InvalidRecord(f"field 'messages' must be a list of messages, got {type(value).__name__}")
        messages = _messages(value, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidRecord("'messages' has no assistant message")
        return {"prompt": "", "completion": _encode(messages), "conversational": 1}
    if "prompt" in obj or "completion" in obj:
        prompt, completion = _text_or_messages(obj, "prompt"), _text_or_messages(obj, "completion")
        if not _same_form([prompt, completion]):
            raise InvalidRecord("'prompt' and 'completion' must both be strings or both be message lists")
        return {
            "prompt": _encode(prompt),
            "completion": _encode(completion),
            "conversational": int(not isinstance(prompt, str)),
        }
    if "text" in obj:
        text = _field(obj, "text")
        if not isinstance(text, str):
            raise InvalidRecord(f"field 'text' must be a string, got {type(text).__name__}")
        if not text:
            raise InvalidRecord("empty field 'text'")
        return {"prompt": "", "completion": text, "conversational": 0}
    raise InvalidRecord("missing field 'messages' (or 'prompt'/'completion', or 'text')")


def parse_prompt_only(obj: Any) -> dict:
    obj = _require_object(obj)
    prompt = _text_or_messages(obj, "prompt")
    extra = {k: v for k, v in obj.items() if k != "prompt"}
    try:
        extra = json.dumps(extra, ensure_ascii=False)
    except (TypeError, ValueError) as e:  # e.g. a binary column of a Parquet / Arrow table
        raise InvalidRecord(f"the fields other than 'prompt' are not JSON-serializable ({e}); drop them") from None
    return {"prompt": _encode(prompt), "conversational": int(not isinstance(prompt, str)), "extra": extra}


PARSERS = {
    "pairwise": parse_pairwise,
    "groupwise": parse_groupwise,
    "sft": parse_sft,
    "prompt_only": parse_prompt_only,
}
