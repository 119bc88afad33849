"""Build the toy-world tokenizer (no download) and save it to ``align_jax/data/toy/tokenizer/``.

    python -m align_jax.data.toy.build_tokenizer [out_dir]

Word-level tokenizer (``tokenizers.models.WordLevel``): spaces become "▁" (Metaspace, never
prepended), then pieces are "▁?word" | one digit | "▁" | one other character. The vocabulary is
special tokens, "▁", the 10 digits, the ASCII punctuation, and every word of the world's
templates with and without the "▁" prefix, padded with ``<unused_k>`` to a multiple of 64.
Digits are single tokens, so arithmetic is learnable; decode(encode(text)) == text for every
text the world emits. No post-processor: the chat template adds ``<bos>`` itself.

Chat template: ``<bos>`` then, per message, ``<|role|>content<eos>`` (assistant turns wrapped in
``{% generation %}`` for assistant-token masks); ``add_generation_prompt`` appends
``<|assistant|>``. Role markers are special tokens, so the assistant reply always starts at a
token boundary and prompt tokens are a prefix of prompt+completion tokens.
"""
from __future__ import annotations

import json
import pathlib
import string
import sys

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from align_jax.data.toy import world

TOKENIZER_DIR = pathlib.Path(__file__).parent / "tokenizer"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIALS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS
SPACE = "\u2581"
PIECE_RE = rf"{SPACE}?[A-Za-z]+|[0-9]|{SPACE}|[^A-Za-z0-9{SPACE}]"
VOCAB_MULTIPLE = 64
MODEL_MAX_LENGTH = 128
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=False),
        pre_tokenizers.Split(Regex(PIECE_RE), behavior="isolated"),
    ])


def vocabulary() -> list[str]:
    """Token strings in id order."""
    pt = pre_tokenizer()
    words = {piece.lstrip(SPACE) for text in world.all_texts()
             for piece, _ in pt.pre_tokenize_str(text) if piece.lstrip(SPACE).isalpha()}
    words = sorted(words)
    vocab = list(SPECIALS) + [SPACE] + list(string.digits) + list(string.punctuation)
    vocab += words + [SPACE + w for w in words]
    vocab += [f"<unused_{i}>" for i in range(-len(vocab) % VOCAB_MULTIPLE)]
    return vocab


def build() -> Tokenizer:
    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=False)
    tok.add_special_tokens(list(SPECIALS))
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": True}
            for t in SPECIALS},
        "chat_template": CHAT_TEMPLATE,
    }


def save(out_dir=TOKENIZER_DIR) -> pathlib.Path:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(out_dir / "tokenizer.json"))
    dump = lambda obj, name: (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n")  # noqa: E731
    dump(tokenizer_config(tok), "tokenizer_config.json")
    dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK},
         "special_tokens_map.json")
    return out_dir


if __name__ == "__main__":
    print(save(sys.argv[1] if len(sys.argv) > 1 else TOKENIZER_DIR))
