"""IFEval-style instruction-following evaluation (Zhou et al. 2023, "Instruction-Following Evaluation for Large
Language Models", arXiv:2311.07911; reference: google-research/instruction_following_eval), pure Python.

Programs check whether a response follows "verifiable instructions" ("answer in fewer than 50 words", "wrap the
answer in double quotes", "do not use commas"...). A prompt file is IFEval's ``input_data.jsonl`` unchanged, one
JSON object a line::

    {"key": 1000, "prompt": "...", "instruction_id_list": ["punctuation:no_comma", ...], "kwargs": [{}, ...]}

``kwargs[i]`` holds the arguments of ``instruction_id_list[i]`` under IFEval's names. A ``null`` value is an
unused argument (the Hugging Face copy of IFEval lists every argument name in every entry) and is ignored.

* ``INSTRUCTIONS``: IFEval instruction id -> ``Instruction`` (its checker, a pure function
  ``check(response, **kwargs) -> bool``, and the kwarg names it takes, all required).
* ``load_prompts(path)`` -> ``[IFEvalPrompt]``; one bad line (malformed JSON, unknown instruction id, missing or
  invalid kwarg) raises ``IFEvalDataError("path:line: ...")``. ``TOY_PROMPTS`` is the small set shipped here
  (``data/ifeval_toy.jsonl``, written for align-jax, covering every id of ``INSTRUCTIONS``).
* ``score(records, responses)`` -> IFEval's four accuracies (prompt / instruction level, strict / loose) and the
  accuracy per instruction id.

Scoring as in the reference's ``evaluation_lib``: an instruction is followed (strict) when the response is not
blank and its checker passes. Loose: the checker passes on any non-blank one of the response, the response with
its first line removed, with its last line removed, with both removed (each stripped), and those four with every
``*`` removed. Prompt-level accuracy is the fraction of prompts whose instructions are all followed;
instruction-level accuracy the fraction of all instructions followed.

Where this differs from the reference (which needs NLTK's punkt model, downloaded at run time, and langdetect):

* ``length_constraints:number_sentences`` counts sentences with ``split_sentences``, a documented regex splitter
  in the spirit of punkt (not its trained model): see its docstring. Counts can differ on abbreviations,
  initials and numbers followed by a period.
* ``change_case:capital_word_frequency`` counts all-caps tokens of ``word_tokens``, a regex approximation of
  NLTK's ``word_tokenize`` (punctuation split off, contractions split as Treebank does: "DON'T" -> "DO", "N'T").
* ``change_case:english_capital`` / ``english_lowercase`` check the case only (``str.isupper`` /
  ``str.islower``); the reference also asks langdetect that the text is English (and counts a detection failure
  as followed), so these two can pass a non-English response that the reference fails.
* ``language:response_language`` needs a language identifier and is refused (``UNSUPPORTED``): a file that uses
  it raises, unless ``load_prompts(..., drop_unsupported=True)`` leaves those prompts out.
* Keywords, forbidden words, postscript markers and section splitters are matched literally (``re.escape``); the
  reference pastes them into regular expressions unescaped (identical for plain words, which IFEval uses).
* ``keywords:letter_frequency`` counts the character given, whatever it is; the reference replaces a
  ``letter`` that is not a-z by a random letter (IFEval's own data has "#" and "!", keys 1122 and 1129, whose
  reference scores are therefore random).
* kwargs are required and validated when loading; the reference draws a random value for a missing one.

No JAX here: this module is plain Python (the generation that makes the responses is elsewhere, e.g.
``align_jax.evaluation.generate_completions``).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from align_jax.errors import UserError
from align_jax.evaluation.records import FieldAccess, responses_for

logger = logging.getLogger(__name__)

TOY_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ifeval_toy.jsonl")

RELATIONS = ("less than", "at least")  # "less than": count < N (strict); "at least": count >= N
CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


class IFEvalDataError(UserError, ValueError):
    """A bad IFEval prompt file or record; the message starts with ``path:line:`` (or the record's position)."""


# ----------------------------------------------------------------------------------------------------------
# Text utilities
# ----------------------------------------------------------------------------------------------------------


def count_words(text: str) -> int:
    """Words as the reference counts them (NLTK ``RegexpTokenizer(r"\\w+")``): runs of word characters, so
    "hydro-thermal" is two words and "don't" two."""
    return len(re.findall(r"\w+", text))


# Abbreviations before a name: a period after them never ends a sentence ("Dr. Smith").
_TITLES = frozenset("mr mrs ms dr prof sr jr st rev fr gen capt col lt sgt hon mt messrs".split())
# Other abbreviations: a period after them ends a sentence only when the next word is capitalized.
_ABBREVIATIONS = frozenset("etc vs approx fig figs dept inc ltd corp co cf al ca est jan feb aug sept oct nov dec "
                           "no nos vol vols pp ed eds".split())
_CLOSERS = "\"'\u201d\u2019)]}"
_OPENERS = "\"'\u201c\u2018([{"
_TERMINATOR = re.compile(r"(?<!\S)(\S*?)([.?!]+)([" + re.escape(_CLOSERS) + r"]*)(?=\s|\Z)")


def _ends_sentence(token: str, terminator: str, rest: str) -> bool:
    """Whether `token` + `terminator` (followed by whitespace, then `rest`) ends a sentence."""
    if "?" in terminator or "!" in terminator:
        return True
    next_upper = rest.lstrip().lstrip(_OPENERS)[:1].isupper()
    if len(terminator) > 1:  # an ellipsis
        return next_upper
    word = token.lstrip(_OPENERS).lower()
    if word in _TITLES or (re.fullmatch(r"[^\W\d_]", word) and word != "i"):  # "Dr. Smith", "J. Smith"
        return False
    if (word in _ABBREVIATIONS
            or re.fullmatch(r"(?:[^\W\d_]{1,3}\.)+[^\W\d_]{1,3}", word)  # dotted: e.g. i.e. U.S. Ph.D.
            or re.fullmatch(r"\d+", word)):  # a number: "1. First step"
        return next_upper
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (non-blank, stripped), by rules that imitate NLTK's punkt without its trained model.

    A sentence ends at a run of ``.``, ``?`` or ``!`` (optionally followed by closing quotes or brackets) that is
    followed by whitespace or the end of the text, except:

    * after a title abbreviation (Mr. Mrs. Ms. Dr. Prof. St. ...) or a single letter other than "I" (an
      initial: "J. Smith") never;
    * after an ellipsis (``..``, ``...``), another known abbreviation (etc. vs. approx. fig. inc. no. ...), a
      dotted abbreviation (e.g. i.e. U.S. Ph.D.) or a number ("1." of a list), only when the next word starts
      with an uppercase letter.

    A period inside a token ("3.14", "example.com") ends nothing. Line breaks alone do not end a sentence (as in
    punkt): a list without final punctuation is one sentence. Text after the last terminator is a sentence.
    """
    out, start = [], 0
    for m in _TERMINATOR.finditer(text):
        if _ends_sentence(m.group(1), m.group(2), text[m.end():]):
            out.append(text[start:m.end()].strip())
            start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def count_sentences(text: str) -> int:
    """Number of sentences of `text` (``split_sentences``)."""
    return len(split_sentences(text))


_CONTRACTION = re.compile(r"(?i)(?<=\w)(n't|'s|'m|'d|'ll|'re|'ve)\b")
_WORD_TOKEN = re.compile(r"'?\w+(?:[-.&'/]\w+)*")


def word_tokens(text: str) -> list[str]:
    """The word tokens of `text`, approximating NLTK's ``word_tokenize`` for the tokens that contain letters or
    digits: punctuation around words is dropped (NLTK makes it separate tokens, which contain no letters),
    hyphenated words and dotted abbreviations stay one token ("well-known", "U.S"), contractions split as in the
    Penn Treebank ("DON'T" -> "DO", "N'T"; "I'M" -> "I", "'M")."""
    return _WORD_TOKEN.findall(_CONTRACTION.sub(r" \1", text.replace("\u2019", "'")))


# ----------------------------------------------------------------------------------------------------------
# Checkers: check(response, **kwargs) -> bool, kwargs under IFEval's names
# ----------------------------------------------------------------------------------------------------------


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def number_words(response: str, *, relation: str, num_words: int) -> bool:
    """``count_words(response)`` < (less than) or >= (at least) `num_words`."""
    return _compare(count_words(response), relation, num_words)


def number_sentences(response: str, *, relation: str, num_sentences: int) -> bool:
    """``count_sentences(response)`` < or >= `num_sentences`."""
    return _compare(count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider ``***``; an empty paragraph between two
    dividers fails, empty ones at the start or the end are not counted."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` non-blank paragraphs separated by a blank line (``\\n\\n``), and paragraph number
    `nth_paragraph` (1-based, counted among all pieces as the reference does) starts with `first_word`
    (case-insensitive; leading quotes dropped, the word cut at the first . , ? ! ' or ")."""
    paragraphs = response.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word.lower()


def keywords_existence(response: str, *, keywords: Sequence[str]) -> bool:
    """Every keyword occurs (case-insensitive substring)."""
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def forbidden_words(response: str, *, forbidden_words: Sequence[str]) -> bool:
    """No forbidden word occurs as a whole word (case-insensitive, ``\\bword\\b``)."""
    return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """Occurrences of `keyword` (case-insensitive substring, non-overlapping) < or >= `frequency`."""
    count = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    return _compare(count, relation, frequency)


def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of `letter` (case-insensitive; any one character, e.g. "#") < or >= `let_frequency`."""
    return _compare(response.lower().count(letter.strip().lower()), let_relation, let_frequency)


def json_format(response: str) -> bool:
    """The whole response is JSON, after stripping and removing a ```` ```json ```` / ```` ``` ```` fence."""
    value = response.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):  # one after the other, as the reference
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly `num_bullets` lines that start (after spaces) with ``*`` not followed by ``*``, or with ``-``."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def title(response: str) -> bool:
    """A title in double angular brackets on one line, not blank: ``<<poem of joy>>``."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections, each starting with `section_spliter` and a number ("Section 1");
    case-sensitive, as the reference."""
    pattern = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= num_sections


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least `num_highlights` non-blank markdown highlights on one line, ``*text*`` (a ``**text**`` counts once,
    as the reference counts it)."""
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip())
    count += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip())
    return count >= num_highlights


def constrained_response(response: str) -> bool:
    """Contains one of "My answer is yes.", "My answer is no.", "My answer is maybe." (case-sensitive)."""
    value = response.strip()
    return any(option in value for option in CONSTRAINED_RESPONSE_OPTIONS)


def english_lowercase(response: str) -> bool:
    """All cased characters lowercase (``str.islower``; the English-language check of the reference is not
    made)."""
    return response.islower()


def english_capital(response: str) -> bool:
    """All cased characters uppercase (``str.isupper``; the English-language check of the reference is not
    made)."""
    return response.isupper()


def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    """Tokens of ``word_tokens`` in all capitals (``str.isupper``: "I", "NASA", "U.S") < or >= `capital_frequency`."""
    count = sum(1 for w in word_tokens(response) if w.isupper())
    return _compare(count, capital_relation, capital_frequency)


def end_checker(response: str, *, end_phrase: str) -> bool:
    """Ends with `end_phrase` (case-insensitive; surrounding whitespace and double quotes of the response
    ignored)."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    """Wrapped in double quotation marks (after stripping whitespace)."""
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def no_comma(response: str) -> bool:
    """No ASCII comma."""
    return "," not in response


def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders such as ``[address]``."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, *, postscript_marker: str) -> bool:
    """A postscript starting with `postscript_marker` (case-insensitive); "P.S." also matches "p. s.", "P.P.S"
    also "p. p. s"."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """Starts with `prompt_to_repeat` word for word (case-insensitive, surrounding whitespace ignored)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(response: str) -> bool:
    """Two different non-blank responses separated by six asterisks ``******``."""
    parts = response.split("******")
    valid = []
    for i, part in enumerate(parts):
        if part.strip():
            valid.append(part)
        elif i not in (0, len(parts) - 1):
            return False
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    """An IFEval instruction: `check(response, **kwargs) -> bool`; `kwargs`: its argument names (all required)."""
    id: str
    check: Callable[..., bool]
    kwargs: tuple[str, ...] = ()


def _registry(*entries) -> dict[str, Instruction]:
    return {i: Instruction(i, fn, tuple(kw)) for i, fn, kw in entries}


INSTRUCTIONS: dict[str, Instruction] = _registry(
    ("keywords:existence", keywords_existence, ["keywords"]),
    ("keywords:frequency", keyword_frequency, ["keyword", "frequency", "relation"]),
    ("keywords:forbidden_words", forbidden_words, ["forbidden_words"]),
    ("keywords:letter_frequency", letter_frequency, ["letter", "let_frequency", "let_relation"]),
    ("length_constraints:number_sentences", number_sentences, ["num_sentences", "relation"]),
    ("length_constraints:number_paragraphs", number_paragraphs, ["num_paragraphs"]),
    ("length_constraints:number_words", number_words, ["num_words", "relation"]),
    ("length_constraints:nth_paragraph_first_word", nth_paragraph_first_word,
     ["num_paragraphs", "nth_paragraph", "first_word"]),
    ("detectable_content:number_placeholders", number_placeholders, ["num_placeholders"]),
    ("detectable_content:postscript", postscript, ["postscript_marker"]),
    ("detectable_format:number_bullet_lists", number_bullet_lists, ["num_bullets"]),
    ("detectable_format:constrained_response", constrained_response, []),
    ("detectable_format:number_highlighted_sections", number_highlighted_sections, ["num_highlights"]),
    ("detectable_format:multiple_sections", multiple_sections, ["section_spliter", "num_sections"]),
    ("detectable_format:json_format", json_format, []),
    ("detectable_format:title", title, []),
    ("combination:two_responses", two_responses, []),
    ("combination:repeat_prompt", repeat_prompt, ["prompt_to_repeat"]),
    ("startend:end_checker", end_checker, ["end_phrase"]),
    ("startend:quotation", quotation, []),
    ("change_case:capital_word_frequency", capital_word_frequency, ["capital_frequency", "capital_relation"]),
    ("change_case:english_capital", english_capital, []),
    ("change_case:english_lowercase", english_lowercase, []),
    ("punctuation:no_comma", no_comma, []),
)

# IFEval ids that align-jax cannot check, and why.
UNSUPPORTED: dict[str, str] = {
    "language:response_language": (
        "needs a language identifier (the reference uses the langdetect package), which align-jax does not ship"),
}

_INT_KWARGS = {"num_words": 0, "num_sentences": 0, "num_paragraphs": 0, "nth_paragraph": 1, "frequency": 0,
               "let_frequency": 0, "num_bullets": 0, "num_highlights": 0, "num_sections": 0, "num_placeholders": 0,
               "capital_frequency": 0}  # name -> smallest legal value
_RELATION_KWARGS = ("relation", "let_relation", "capital_relation")
_LIST_KWARGS = ("keywords", "forbidden_words")


def _validate_kwarg(name: str, value: Any) -> Any:
    """The value of kwarg `name`, normalized (an integral float -> int); raises ValueError with the reason."""
    if name in _INT_KWARGS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < _INT_KWARGS[name]:
            raise ValueError(f"{name} must be >= {_INT_KWARGS[name]}, got {value}")
        return value
    if name in _RELATION_KWARGS:
        if value not in RELATIONS:
            raise ValueError(f"{name} must be one of {RELATIONS}, got {value!r}")
        return value
    if name in _LIST_KWARGS:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {value!r}")
        return list(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if name == "letter" and len(value.strip()) != 1:
        raise ValueError(f"letter must be one character (a letter, or e.g. '#'), got {value!r}")
    return value


def check(instruction_id: str, response: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """Whether `response` follows instruction `instruction_id` with `kwargs` (strict: a blank response follows
    nothing). None values in `kwargs` are ignored."""
    if instruction_id not in INSTRUCTIONS:
        why = UNSUPPORTED.get(instruction_id, f"unknown; known: {', '.join(sorted(INSTRUCTIONS))}")
        raise IFEvalDataError(f"instruction {instruction_id!r}: {why}")
    inst = INSTRUCTIONS[instruction_id]
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    return bool(response.strip()) and bool(inst.check(response, **kw))


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IFEvalPrompt(FieldAccess):
    """One IFEval prompt; `kwargs[i]` (None values removed, validated) goes with `instruction_id_list[i]`."""
    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]
    source: str = ""  # "path:line" (or where the record came from), for messages


def _expected_format() -> str:
    return ('expected {"key": int, "prompt": str, "instruction_id_list": [str, ...], "kwargs": [{...}, ...]} '
            "(IFEval's input_data.jsonl format)")


def parse_prompt(obj: Any, source: str = "record", *, drop_unsupported: bool = False) -> IFEvalPrompt | None:
    """`obj` (a decoded JSON line) as an ``IFEvalPrompt``; None for a prompt with an unsupported instruction when
    `drop_unsupported`. Raises ``IFEvalDataError("<source>: reason")``."""
    def fail(msg):
        raise IFEvalDataError(f"{source}: {msg}")

    if not isinstance(obj, dict):
        fail(f"not a JSON object but {type(obj).__name__}; {_expected_format()}")
    missing = [f for f in ("key", "prompt", "instruction_id_list", "kwargs") if f not in obj]
    if missing:
        fail(f"missing field(s) {', '.join(missing)}; {_expected_format()}")
    key, prompt, ids, kwargs = obj["key"], obj["prompt"], obj["instruction_id_list"], obj["kwargs"]
    if isinstance(key, bool) or not isinstance(key, int):
        fail(f"key must be an integer, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        fail(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        fail(f"instruction_id_list must be a non-empty list of strings, got {ids!r}")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        fail(f"kwargs must be a list with one object per instruction id ({len(ids)}), got {kwargs!r}")
    clean = []
    for i, (iid, kw) in enumerate(zip(ids, kwargs)):
        if iid in UNSUPPORTED:
            if drop_unsupported:
                return None
            fail(f"instruction {iid!r} is not supported: {UNSUPPORTED[iid]}; pass drop_unsupported=True to leave "
                 "the prompts that use it out of the evaluation")
        if iid not in INSTRUCTIONS:
            near = difflib.get_close_matches(iid, list(INSTRUCTIONS), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            fail(f"unknown instruction id {iid!r}{hint}; known: {', '.join(sorted(INSTRUCTIONS))}")
        if kw is None:
            kw = {}
        if not isinstance(kw, dict):
            fail(f"kwargs[{i}] ({iid}) must be an object, got {kw!r}")
        kw = {k: v for k, v in kw.items() if v is not None}
        wanted = INSTRUCTIONS[iid].kwargs
        absent = [k for k in wanted if k not in kw]
        if absent:
            fail(f"kwargs[{i}] ({iid}) lacks {', '.join(absent)}; it takes {', '.join(wanted) or 'no kwargs'}")
        extra = [k for k in kw if k not in wanted]
        if extra:
            fail(f"kwargs[{i}] ({iid}) has unexpected {', '.join(extra)}; it takes "
                 f"{', '.join(wanted) or 'no kwargs'} (null values are ignored)")
        try:
            kw = {k: _validate_kwarg(k, kw[k]) for k in wanted}
        except ValueError as e:
            fail(f"kwargs[{i}] ({iid}): {e}")
        if "nth_paragraph" in kw and kw["nth_paragraph"] > kw["num_paragraphs"]:
            fail(f"kwargs[{i}] ({iid}): nth_paragraph {kw['nth_paragraph']} > num_paragraphs {kw['num_paragraphs']}")
        clean.append(kw)
    return IFEvalPrompt(key, prompt, tuple(ids), tuple(clean), source)


def load_prompts(path: str = TOY_PROMPTS, *, drop_unsupported: bool = False) -> list[IFEvalPrompt]:
    """The prompts of an IFEval ``input_data.jsonl`` file (blank lines ignored), in file order. Raises
    ``IFEvalDataError("path:line: reason")`` at the first bad line (malformed JSON, unknown instruction id, missing
    or invalid kwarg, a key used twice) and for a file without prompts. With `drop_unsupported`, prompts using an
    instruction of ``UNSUPPORTED`` are left out (and counted in a log line) instead of raising."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise IFEvalDataError(f"{path}: cannot read the prompt file ({e})") from None
    out, seen, dropped = [], {}, 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise IFEvalDataError(f"{source}: malformed JSON: {e.msg} (column {e.colno})") from None
        rec = parse_prompt(obj, source, drop_unsupported=drop_unsupported)
        if rec is None:
            dropped += 1
            continue
        if rec.key in seen:
            raise IFEvalDataError(f"{source}: key {rec.key} is already used at line {seen[rec.key]}")
        seen[rec.key] = n
        out.append(rec)
    if dropped:
        logger.warning("%s: left out %d prompt(s) with unsupported instructions (%s)", path, dropped,
                       ", ".join(UNSUPPORTED))
    if not out:
        raise IFEvalDataError(f"{path}: no prompts")
    return out


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


def loose_variants(response: str) -> list[str]:
    """The responses the loose score tries, in the reference's order: the response, it without ``*``, it without
    its first line, last line, both (stripped), and those three without ``*``."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


def follows(record: IFEvalPrompt, response: str, *, loose: bool = False) -> list[bool]:
    """For each instruction of `record`, whether `response` follows it (strict, or `loose`)."""
    candidates = loose_variants(response) if loose else [response]
    candidates = [r for r in candidates if r.strip()]
    return [any(INSTRUCTIONS[iid].check(r, **kw) for r in candidates)
            for iid, kw in zip(record.instruction_id_list, record.kwargs)]


def _as_records(records) -> list[IFEvalPrompt]:
    out = []
    for i, r in enumerate(records):
        out.append(r if isinstance(r, IFEvalPrompt) else parse_prompt(r, f"records[{i}]"))
    return out


def _responses_for(records: list[IFEvalPrompt], responses) -> list[str]:
    return responses_for(records, responses, "key", IFEvalDataError)


def score(records: Sequence[IFEvalPrompt | dict], responses: Sequence[str] | Mapping[int, str]) -> dict:
    """IFEval's accuracies of `responses` to `records` (``IFEvalPrompt``s, or dicts as in the prompt file).

    `responses`: one string per record, in order, or a mapping record key -> string. Returns::

        {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc":
         float, "num_prompts", "num_instructions": int,
         "per_instruction": {instruction id: {"count": int, "strict_acc": float, "loose_acc": float}}}
    """
    records = _as_records(records)
    if not records:
        raise IFEvalDataError("score: no prompts to score")
    texts = _responses_for(records, responses)
    prompt_ok = {"strict": 0, "loose": 0}
    inst_ok = {"strict": 0, "loose": 0}
    per = collections.defaultdict(lambda: {"count": 0, "strict": 0, "loose": 0})
    n_inst = 0
    for rec, text in zip(records, texts):
        for mode in ("strict", "loose"):
            res = follows(rec, text, loose=mode == "loose")
            prompt_ok[mode] += all(res)
            inst_ok[mode] += sum(res)
            for iid, ok in zip(rec.instruction_id_list, res):
                per[iid][mode] += ok
        for iid in rec.instruction_id_list:
            per[iid]["count"] += 1
        n_inst += len(rec.instruction_id_list)
    out = {}
    for mode in ("strict", "loose"):
        out[f"prompt_level_{mode}_acc"] = prompt_ok[mode] / len(records)
        out[f"inst_level_{mode}_acc"] = inst_ok[mode] / n_inst
    out["num_prompts"], out["num_instructions"] = len(records), n_inst
    out["per_instruction"] = {
        iid: {"count": c["count"], "strict_acc": c["strict"] / c["count"], "loose_acc": c["loose"] / c["count"]}
        for iid, c in sorted(per.items())}
    return out
