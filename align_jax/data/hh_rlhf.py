"""Anthropic HH-RLHF from its original files in a local directory (nothing is downloaded).

Layout (as published): ``{subset}/{split}.jsonl.gz`` (or ``.jsonl``) with subsets ``harmless-base``,
``helpful-base``, ``helpful-online``, ``helpful-rejection-sampled``; each line is
``{"chosen": transcript, "rejected": transcript}``, a transcript being ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
turns, chosen and rejected differing in the last assistant turn. (``red-team-attempts`` has another format.)

Two ways to split a line into a pairwise example (stored as ``kind="pairwise"``, see ``builders``):

* ``style="conversational"`` (default): TRL's ``examples/datasets/hh-rlhf-helpful-base.py`` (``extract_dialogue``):
  the prompt is the common start of both transcripts cut back to end with ``"\\n\\nAssistant: "``, split at
  ``"\\n\\nHuman: "`` / ``"\\n\\nAssistant: "`` into user / assistant messages; chosen and rejected are one
  assistant message each (the rest of each transcript). Rendered later with the tokenizer's chat template.
* ``style="raw"``: the DPO reference code (``split_prompt_and_responses``): the prompt is the chosen transcript up
  to and including its last ``"\\n\\nAssistant:"``; the responses are the rest of each transcript.

Unlike those scripts, a line whose transcripts do not fit the format (no Human/Assistant turns, rejected not
sharing the prompt, an empty response) is a bad example: ``DataError("file:line: ...")`` or skipped and counted.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

from align_jax.data import builders, formats
from align_jax.data.formats import InvalidRecord

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "


def _transcripts(obj) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(obj).__name__}")
    out = []
    for name in ("chosen", "rejected"):
        if obj.get(name) is None:
            raise InvalidRecord(f"missing field {name!r}")
        if not isinstance(obj[name], str):
            raise InvalidRecord(f"field {name!r} must be a string, got {type(obj[name]).__name__}")
        if not obj[name]:
            raise InvalidRecord(f"empty field {name!r}")
        out.append(obj[name])
    return out[0], out[1]


def _common_start(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def split_conversational(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """TRL ``extract_dialogue``: ``(prompt messages, chosen response, rejected response)``."""
    prompt_text = _common_start(chosen, rejected)
    if not prompt_text.endswith(ASSISTANT):
        cut = prompt_text.rfind(ASSISTANT)
        if cut < 0:
            raise InvalidRecord("no '\\n\\nAssistant: ' turn shared by 'chosen' and 'rejected'")
        prompt_text = prompt_text[:cut] + ASSISTANT
    chosen_line, rejected_line = chosen[len(prompt_text) :], rejected[len(prompt_text) :]
    prompt_text = prompt_text[: -len(ASSISTANT)]
    parts = re.split(r"(\n\nAssistant: |\n\nHuman: )", prompt_text)
    if parts[0] or len(parts) < 3:
        raise InvalidRecord("transcript does not start with '\\n\\nHuman: '")
    prompt = [
        {"role": "user" if parts[i] == HUMAN else "assistant", "content": parts[i + 1]}
        for i in range(1, len(parts), 2)
    ]
    return prompt, chosen_line, rejected_line


def split_raw(chosen: str, rejected: str) -> tuple[str, str, str]:
    """DPO reference ``split_prompt_and_responses``: ``(prompt, chosen response, rejected response)``."""
    term = "\n\nAssistant:"
    cut = chosen.rfind(term)
    if cut < 0:
        raise InvalidRecord("no '\\n\\nAssistant:' turn in 'chosen'")
    prompt = chosen[: cut + len(term)]
    if not rejected.startswith(prompt):
        raise InvalidRecord("'rejected' does not start with the prompt of 'chosen'")
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def parse_hh_line(obj, style: str = "conversational") -> dict:
    """One HH-RLHF JSON line -> a normalized pairwise record (see ``formats.parse_pairwise``)."""
    chosen, rejected = _transcripts(obj)
    if style == "conversational":
        prompt, c, r = split_conversational(chosen, rejected)
        record = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
    elif style == "raw":
        prompt, c, r = split_raw(chosen, rejected)
        record = {"prompt": prompt, "chosen": c, "rejected": r}
    else:
        raise ValueError(f"style must be 'conversational' or 'raw', got {style!r}")
    if not c or not r:
        raise InvalidRecord("empty chosen or rejected response")
    return formats.parse_pairwise(record)


def hh_files(hh_dir: str, split: str, subsets: Sequence[str] | None = None) -> list[str]:
    subsets = tuple(subsets) if subsets else SUBSETS
    files = []
    for subset in subsets:
        found = sorted(glob.glob(os.path.join(hh_dir, subset, f"{split}.jsonl*")))
        files.extend(f for f in found if f.endswith((".jsonl", ".jsonl.gz")))
    return files


def build_hh_rlhf(
    hh_dir: str,
    *,
    data_dir: str,
    subsets: Sequence[str] | None = None,
    style: str = "conversational",
    splits: Sequence[str] = ("train", "test"),
    on_bad_example: str = "raise",
) -> tuple[builders.AlignJaxData, builders.BuildStats]:
    """TFDS ``pairwise`` dataset of the HH-RLHF files under ``hh_dir`` (subsets that exist are used)."""
    if style not in ("conversational", "raw"):
        raise ValueError(f"style must be 'conversational' or 'raw', got {style!r}")
    split_files = {s: hh_files(hh_dir, s, subsets) for s in splits}
    split_files = {s: f for s, f in split_files.items() if f}
    if not split_files:
        raise FileNotFoundError(f"no HH-RLHF {list(splits)} files under {hh_dir!r} (expected subset/split.jsonl.gz)")

    def parse(obj):
        return parse_hh_line(obj, style)

    builder = builders.AlignJaxData(
        kind="pairwise",
        split_files=split_files,
        data_dir=data_dir,
        parse=parse,
        options=f"hh_rlhf|{style}",
        on_bad_example=on_bad_example,
    )
    return builders.build(builder, on_bad_example)
