"""Raw data formats: reading JSON / JSONL files and validating each record into a normalized example.

Input files are a JSON array of objects (``[{...}, {...}]``) or JSON Lines (one object per line); a ``.gz``
suffix means gzip. The format is sniffed: a file whose first non-blank character is ``[`` is an array, anything
else is read as JSONL (so ``.json`` files holding JSONL work too). Blank lines in JSONL are ignored.

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

Normalized example (what the TFDS builder stores). Strings are stored as text; a conversational value is stored as
its JSON encoding and ``conversational`` is 1. ``source`` is ``"path:line"`` so later errors can name the line.

Bad input (malformed JSON, invalid UTF-8, non-object record, missing/empty/non-string field, bad ranks, ...)
raises ``DataError("path:line: reason")``. With ``on_bad_example="skip"`` the record is skipped and counted in a
``SkipLog`` (count + first reasons, logged). Syntax or encoding errors inside a JSON *array* file cannot be
localized to one element, so they always raise.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

from align_jax.errors import UserError

logger = logging.getLogger(__name__)

KINDS = ("pairwise", "groupwise", "sft", "prompt_only")
ON_BAD_EXAMPLE = ("raise", "skip")
MAX_REASONS = 10  # reasons kept (and logged one by one) per SkipLog


class DataError(UserError, ValueError):
    """A bad input example; the message starts with ``path:line:``."""


class InvalidRecord(ValueError):
    """Raised by the ``parse_*`` functions; the caller prefixes it with ``path:line``."""


@dataclasses.dataclass
class SkipLog:
    """Counts skipped bad examples and keeps the first ``MAX_REASONS`` reasons (each also logged)."""

    on_bad_example: str = "raise"
    num_skipped: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)

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


def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yields ``(line_number, value)`` per record of a JSONL or JSON-array file (1-based line numbers).

    A JSONL line that is not valid UTF-8 or not valid JSON yields ``(line, DataError)`` instead of a value, so
    the caller may skip it. For a JSON array the line is that of the element's first character; a syntax or
    encoding error in an array raises ``DataError`` directly.
    """
    data = _read_bytes(path)
    if data.lstrip()[:1] == b"[":
        yield from _iter_json_array(path, data)
        return
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, DataError(f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line")
            continue
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as e:
            yield line_no, DataError(f"{path}:{line_no}: malformed JSON: {e.msg} (column {e.colno})")


def _iter_json_array(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    decoder = json.JSONDecoder()
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
        yield line_of(pos), value
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                raise DataError(f"{path}:{line_of(pos)}: unexpected data after the JSON array")
            return
        raise DataError(f"{path}:{line_of(min(pos, len(text)))}: malformed JSON array: expected ',' or ']'")


def read_examples(path: str, kind: str, skip_log: SkipLog, parse=None) -> Iterator[dict]:
    """Yields normalized examples of ``path`` (each with ``source = "path:line"``), bad ones via ``skip_log``."""
    parse = parse or PARSERS[kind]
    for line_no, value in iter_json_records(path):
        where = f"{path}:{line_no}"
        if isinstance(value, DataError):
            skip_log.bad(str(value))
            continue
        try:
            example = parse(value)
        except InvalidRecord as e:
            skip_log.bad(f"{where}: {e}")
            continue
        example["source"] = where
        yield example


# ------------------------------------------------------------------------------------------ field validation


def _field(obj: dict, name: str) -> Any:
    if name not in obj or obj[name] is None:
        raise InvalidRecord(f"missing field {name!r}")
    return obj[name]


def _messages(value: Any, name: str) -> list[dict]:
    if not value:
        raise InvalidRecord(f"empty field {name!r}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRecord(f"field {name!r}: message {i} is not a {{'role', 'content'}} object")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise InvalidRecord(f"field {name!r}: message {i} has a non-string role or content")
    return list(value)


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
    return {
        "prompt": _encode(prompt),
        "conversational": int(not isinstance(prompt, str)),
        "extra": json.dumps(extra, ensure_ascii=False),
    }


PARSERS = {
    "pairwise": parse_pairwise,
    "groupwise": parse_groupwise,
    "sft": parse_sft,
    "prompt_only": parse_prompt_only,
}
