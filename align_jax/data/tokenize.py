"""Tokenization of normalized examples, following TRL 1.x (trl 1.16: ``DPOTrainer._prepare_dataset`` /
``DataCollatorForPreference``, ``SFTTrainer._prepare_dataset``, ``GRPOTrainer._tokenize_prompts``).

Every sequence is a full model input ``prompt + completion`` with a ``completion_mask`` that is 0 on prompt tokens.

Followed from TRL:
* Text: ``ids = tokenizer(text)["input_ids"]`` (special tokens added, e.g. BOS). The EOS *text* is appended to
  each completion unless it already ends with it (``add_eos``), then prompt and prompt+completion are tokenized
  *jointly* -- ``tokenizer(prompt)`` and ``tokenizer(prompt + completion)`` -- so the ids are exactly what the
  model sees, even when tokens merge across the boundary.
* Conversations: ``apply_chat_template(prompt, add_generation_prompt=True)`` and
  ``apply_chat_template(prompt + completion)`` (tokenize=True; no EOS added, the template ends the turn).
* The completion starts at ``prompt_len = common_prefix_length(prompt_ids, prompt_completion_ids)``, the minimum
  over all completions of an example (chosen and rejected, or the K responses).
* Truncation of the full sequence to ``max_length``: ``keep_start`` keeps ``ids[:max_length]``, ``keep_end``
  keeps ``ids[-max_length:]``; the mask is sliced the same way.
* Pairwise / groupwise with ``keep_start``: a prompt of ``>= max_length`` tokens leaves no completion token.
  TRL drops such examples silently; here it is a bad example (``InvalidRecord``, reported with the source line).
* SFT: prompt-completion data masks the prompt (TRL's ``completion_only_loss``); plain ``text`` trains on all
  tokens. An example whose mask is all 0 after truncation is a bad example (TRL drops it silently).
* Prompt-only (GRPO): ``apply_chat_template(prompt, add_generation_prompt=True)`` or ``tokenizer(prompt)``.

Every ``tokenize_*`` returns ``truncated`` (bool) next to its arrays: whether ``max_length`` /
``max_prompt_length`` cut tokens off (legal, but counted and reported by ``pipeline.make_loader``). An exception of
the chat template (e.g. a template that refuses a role order) is a bad example (``InvalidRecord``).

Where this differs from TRL:
* ``max_prompt_length`` (not in TRL 1.x, from TRL 0.x ``tokenize_row`` / GRPO): when set, the prompt part keeps
  its *last* ``max_prompt_length`` tokens before the full-sequence truncation. For prompt-only data the prompt
  keeps its last ``max_prompt_length`` tokens (or ``max_length`` when unset).
* SFT ``messages`` data: loss only on assistant turns, found by rendering growing prefixes of the conversation:
  assistant turn i spans ``[len(chat(messages[:i], add_generation_prompt=True)), len(chat(messages[:i+1])))``
  (each clipped to the common prefix with the full rendering). TRL trains on all tokens by default, or needs
  ``{% generation %}`` markers in the template for ``assistant_only_loss``; this needs neither.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from align_jax.data.formats import DataError, InvalidRecord, decode_value

TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    max_length: int
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.max_length < 1 or (self.max_prompt_length is not None and self.max_prompt_length < 1):
            raise ValueError("max_length and max_prompt_length must be positive")


# --------------------------------------------------------------------------------------------- primitives


def tokenize_text(tokenizer, text: str) -> list[int]:
    """TRL ``_tokenize`` for a string: ``tokenizer(text)`` with the tokenizer's special tokens."""
    return list(tokenizer(text)["input_ids"])


def tokenize_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
    """TRL ``_tokenize`` for a conversation: ``apply_chat_template(tokenize=True)``."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"conversational data (lists of messages) needs a chat template, and the tokenizer "
                        f"{getattr(tokenizer, 'name_or_path', '')!r} has none: set --config.model.chat_template=chatml "
                        f"(or a .jinja file), or --config.model.tokenizer=<a tokenizer directory that has one>")
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja's TemplateError (e.g. raise_exception in the template), or any other failure
        raise InvalidRecord(
            f"the tokenizer's chat template failed on this conversation: {type(e).__name__}: {e}; "
            "fix the messages (roles, order) or use a tokenizer whose template accepts them"
        ) from e
    return list(out["input_ids"])


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    n = 0
    for a, b in zip(ids, other_ids):
        if a != b:
            break
        n += 1
    return n


def add_eos(text: str, eos_token: str) -> str:
    """TRL ``add_eos``: append the EOS text unless already there."""
    return text if text.endswith(eos_token) else text + eos_token


def truncate(ids: list[int], mask: list[int], max_length: int, mode: str) -> tuple[list[int], list[int]]:
    sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return ids[sl], mask[sl]


def prompt_and_completions(tokenizer, prompt, completions: list, conversational: bool):
    """TRL DPO ``tokenize_fn`` for K completions: ``(prompt_len, [prompt+completion ids])``.

    ``prompt_len`` is the minimum common prefix of the tokenized prompt with every tokenized prompt+completion.
    """
    if conversational:
        prompt_ids = tokenize_chat(tokenizer, prompt, add_generation_prompt=True)
        full = [tokenize_chat(tokenizer, prompt + c) for c in completions]
    else:
        eos = tokenizer.eos_token
        prompt_ids = tokenize_text(tokenizer, prompt)
        full = [tokenize_text(tokenizer, prompt + add_eos(c, eos)) for c in completions]
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_len, full


def _clip_prompt(prompt_len: int, full: list[list[int]], cfg: TokenizeConfig):
    """``max_prompt_length``: keep the last tokens of the prompt part."""
    if cfg.max_prompt_length is None or prompt_len <= cfg.max_prompt_length:
        return prompt_len, full
    cut = prompt_len - cfg.max_prompt_length
    return cfg.max_prompt_length, [ids[cut:] for ids in full]


def _sequences(prompt_len: int, full: list[list[int]], cfg: TokenizeConfig):
    """Prompt clip, the keep_start over-long-prompt check, truncation: ``([(ids, completion_mask)], truncated)``."""
    clipped = cfg.max_prompt_length is not None and prompt_len > cfg.max_prompt_length
    prompt_len, full = _clip_prompt(prompt_len, full, cfg)
    if cfg.truncation_mode == "keep_start" and prompt_len >= cfg.max_length:
        raise InvalidRecord(
            f"prompt has {prompt_len} tokens, >= max_length={cfg.max_length}: no completion token would remain; "
            "raise max_length (or set max_prompt_length, or use truncation_mode='keep_end')"
        )
    out = []
    for ids in full:
        mask = [0] * prompt_len + [1] * (len(ids) - prompt_len)
        ids, mask = truncate(ids, mask, cfg.max_length, cfg.truncation_mode)
        out.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return out, clipped or any(len(ids) > cfg.max_length for ids in full)


# ------------------------------------------------------------------------------------------- per kind


def tokenize_pairwise(ex: dict, tokenizer, cfg: TokenizeConfig) -> dict:
    conv = bool(ex["conversational"])
    prompt = decode_value(ex["prompt"], conv)
    completions = [decode_value(ex["chosen"], conv), decode_value(ex["rejected"], conv)]
    seqs, truncated = _sequences(*prompt_and_completions(tokenizer, prompt, completions, conv), cfg)
    (c_ids, c_mask), (r_ids, r_mask) = seqs
    if truncated and np.array_equal(c_ids, r_ids) and np.array_equal(c_mask, r_mask):
        raise InvalidRecord(f"chosen and rejected are identical after truncation to max_length={cfg.max_length} "
                            f"tokens (they differ only beyond it): no preference signal is left; raise "
                            f"data.max_length")
    return {
        "chosen_input_ids": c_ids,
        "chosen_completion_mask": c_mask,
        "rejected_input_ids": r_ids,
        "rejected_completion_mask": r_mask,
        "label_prob": np.float32(ex["chosen_prob"]),
        "truncated": truncated,
    }


def tokenize_groupwise(ex: dict, tokenizer, cfg: TokenizeConfig) -> dict:
    conv = bool(ex["conversational"])
    prompt = decode_value(ex["prompt"], conv)
    completions = [decode_value(r, conv) for r in ex["responses"]]
    seqs, truncated = _sequences(*prompt_and_completions(tokenizer, prompt, completions, conv), cfg)
    return {
        "input_ids": [s[0] for s in seqs],
        "completion_mask": [s[1] for s in seqs],
        "ranks": np.asarray(ex["ranks"], np.int32),
        "scores": np.asarray(ex["scores"], np.float32),
        "truncated": truncated,
    }


def _assistant_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    full = tokenize_chat(tokenizer, messages)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = common_prefix_length(tokenize_chat(tokenizer, messages[:i], add_generation_prompt=True), full)
        end = common_prefix_length(tokenize_chat(tokenizer, messages[: i + 1]), full)
        mask[start:end] = [1] * max(0, end - start)
    return full, mask


def tokenize_sft(ex: dict, tokenizer, cfg: TokenizeConfig) -> dict:
    conv = bool(ex["conversational"])
    clipped = False
    if not ex["prompt"]:  # messages (conversational) or text
        if conv:
            ids, mask = _assistant_mask(tokenizer, json.loads(ex["completion"]))
        else:
            ids = tokenize_text(tokenizer, add_eos(ex["completion"], tokenizer.eos_token))
            mask = [1] * len(ids)
    else:
        prompt_len, full = prompt_and_completions(
            tokenizer, decode_value(ex["prompt"], conv), [decode_value(ex["completion"], conv)], conv
        )
        clipped = cfg.max_prompt_length is not None and prompt_len > cfg.max_prompt_length
        prompt_len, full = _clip_prompt(prompt_len, full, cfg)
        ids = full[0]
        mask = [0] * prompt_len + [1] * (len(ids) - prompt_len)
    truncated = clipped or len(ids) > cfg.max_length
    ids, mask = truncate(ids, mask, cfg.max_length, cfg.truncation_mode)
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if not mask.any():
        raise InvalidRecord(
            f"no completion token left after truncation to max_length={cfg.max_length}; raise max_length "
            "(or use truncation_mode='keep_end')"
        )
    return {"input_ids": ids, "completion_mask": mask, "truncated": truncated}


def tokenize_prompt_only(ex: dict, tokenizer, cfg: TokenizeConfig) -> dict:
    conv = bool(ex["conversational"])
    prompt = decode_value(ex["prompt"], conv)
    ids = tokenize_chat(tokenizer, prompt, add_generation_prompt=True) if conv else tokenize_text(tokenizer, prompt)
    limit = cfg.max_prompt_length or cfg.max_length
    return {
        "prompt_ids": np.asarray(ids[-limit:], np.int32),
        "prompt_text": prompt,
        "extra": json.loads(ex["extra"]) if ex.get("extra") else {},
        "truncated": len(ids) > limit,
    }


TOKENIZERS = {
    "pairwise": tokenize_pairwise,
    "groupwise": tokenize_groupwise,
    "sft": tokenize_sft,
    "prompt_only": tokenize_prompt_only,
}
