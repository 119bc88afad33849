"""Embedded default task: a synthetic, seeded, download-free "toy assistant" world.

Skills: 2-digit arithmetic and one-word facts with checkable answers, three checkable format
instructions, and a safety rule (refuse requests for the secret password, but not benign
look-alikes). See ``world`` (templates), ``scoring`` (gold reward, reward functions),
``datasets`` (``generate``) and ``build_tokenizer`` (the saved tokenizer in ``TOKENIZER_DIR``).
"""
from __future__ import annotations

import json
import pathlib

from align_jax.data.toy.datasets import generate, read_jsonl
from align_jax.data.toy.scoring import (axis_scores, correctness_reward, evaluate, format_reward,
                                        gold_reward, gold_reward_func, safety_reward)
from align_jax.data.toy.world import parse_prompt

TOY_DIR = pathlib.Path(__file__).parent
TOKENIZER_DIR = TOY_DIR / "tokenizer"
MODEL_CONFIG_PATH = TOY_DIR / "model_config.json"


def toy_model_config() -> dict:
    """The tiny Llama config (HF ``config.json`` dict) sized for the toy tokenizer."""
    return json.loads(MODEL_CONFIG_PATH.read_text())


def load_tokenizer():
    """``transformers.AutoTokenizer`` for the saved toy tokenizer (PreTrainedTokenizerFast)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


__all__ = ["TOKENIZER_DIR", "MODEL_CONFIG_PATH", "toy_model_config", "load_tokenizer", "generate",
           "read_jsonl", "axis_scores", "gold_reward", "evaluate", "correctness_reward",
           "format_reward", "safety_reward", "gold_reward_func", "parse_prompt"]
