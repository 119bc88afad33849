"""Tokenization (TRL 1.x semantics) and bucket collation, against hand-tokenized ids.

The tokenizer is a word-level vocabulary (whitespace split, BOS prepended to plain text) wrapped in
``PreTrainedTokenizerFast`` with a small chat template, so every expected id below can be read off ``VOCAB``.
The same rules were checked against trl 1.16's ``DPOTrainer._prepare_dataset`` + ``DataCollatorForPreference``
and ``SFTTrainer._prepare_dataset`` on these examples (outside the suite: trl needs torch).
"""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from align_jax.data import pipeline
from align_jax.data.formats import InvalidRecord
from align_jax.data.tokenize import TokenizeConfig, tokenize_groupwise, tokenize_pairwise, tokenize_prompt_only
from align_jax.data.tokenize import tokenize_sft

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["hello", "world", "how", "are", "you", "fine", "bad", "!", "?"] + [str(i) for i in range(40)]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}
PAD, EOS, BOS, UNK, USER, ASSISTANT, END = range(7)
HELLO, WORLD, HOW, ARE, YOU, FINE, BAD, BANG, QMARK = range(7, 16)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer():
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
        chat_template=CHAT_TEMPLATE,
    )


TOK = make_tokenizer()
BIG = TokenizeConfig(max_length=1000)


def pairwise(prompt, chosen, rejected, conv=False, prob=1.0):
    enc = json.dumps if conv else (lambda x: x)
    return {"prompt": enc(prompt), "chosen": enc(chosen), "rejected": enc(rejected),
            "chosen_prob": prob, "conversational": int(conv)}  # fmt: skip


def lists(out, *keys):
    return [out[k].tolist() for k in keys]


KEYS = ("chosen_input_ids", "chosen_completion_mask", "rejected_input_ids", "rejected_completion_mask")


def test_pairwise_text_joint_tokenization_and_eos():
    out = tokenize_pairwise(pairwise("hello world", " fine !", " bad", prob=0.25), TOK, BIG)
    assert lists(out, *KEYS) == [
        [BOS, HELLO, WORLD, FINE, BANG, EOS], [0, 0, 0, 1, 1, 1],
        [BOS, HELLO, WORLD, BAD, EOS], [0, 0, 0, 1, 1],
    ]  # fmt: skip
    assert out["label_prob"] == np.float32(0.25)
    # EOS text already there: not appended twice.
    out = tokenize_pairwise(pairwise("hello", " fine<eos>", " bad"), TOK, BIG)
    assert out["chosen_input_ids"].tolist() == [BOS, HELLO, FINE, EOS]


def test_pairwise_prompt_boundary_uses_common_prefix():
    # "hello" + "world !" tokenizes as "helloworld" (unknown): the completion starts where the prompt ids and the
    # prompt+completion ids diverge, the minimum over chosen and rejected (TRL's common_prefix_length).
    out = tokenize_pairwise(pairwise("hello", "world !", " bad"), TOK, BIG)
    assert lists(out, *KEYS) == [[BOS, UNK, BANG, EOS], [0, 1, 1, 1], [BOS, HELLO, BAD, EOS], [0, 1, 1, 1]]


def test_pairwise_conversational_uses_chat_template():
    user = [{"role": "user", "content": "how are you ?"}]
    out = tokenize_pairwise(
        pairwise(user, [{"role": "assistant", "content": "fine !"}], [{"role": "assistant", "content": "bad"}], True),
        TOK,
        BIG,
    )
    prompt = [USER, HOW, ARE, YOU, QMARK, END, ASSISTANT]
    assert lists(out, *KEYS) == [
        prompt + [FINE, BANG, END], [0] * 7 + [1, 1, 1], prompt + [BAD, END], [0] * 7 + [1, 1],
    ]  # fmt: skip


def test_truncation_modes_and_max_prompt_length():
    ex = pairwise("hello world", " fine !", " bad")
    out = tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=5, truncation_mode="keep_start"))
    assert lists(out, *KEYS) == [
        [BOS, HELLO, WORLD, FINE, BANG], [0, 0, 0, 1, 1], [BOS, HELLO, WORLD, BAD, EOS], [0, 0, 0, 1, 1],
    ]  # fmt: skip
    out = tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=4, truncation_mode="keep_end"))
    assert lists(out, *KEYS) == [[WORLD, FINE, BANG, EOS], [0, 1, 1, 1], [HELLO, WORLD, BAD, EOS], [0, 0, 1, 1]]
    out = tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=100, max_prompt_length=2))
    assert lists(out, *KEYS) == [
        [HELLO, WORLD, FINE, BANG, EOS], [0, 0, 1, 1, 1], [HELLO, WORLD, BAD, EOS], [0, 0, 1, 1],
    ]  # fmt: skip
    # A prompt that fills max_length leaves no completion token with keep_start (TRL drops it; we report it).
    long = pairwise("how are you ?", " fine", " bad")
    with pytest.raises(InvalidRecord, match="prompt has 5 tokens, >= max_length=5"):
        tokenize_pairwise(long, TOK, TokenizeConfig(max_length=5))
    out = tokenize_pairwise(long, TOK, TokenizeConfig(max_length=5, truncation_mode="keep_end"))
    assert lists(out, *KEYS) == [
        [ARE, YOU, QMARK, FINE, EOS], [0, 0, 0, 1, 1], [ARE, YOU, QMARK, BAD, EOS], [0, 0, 0, 1, 1],
    ]  # fmt: skip


def test_groupwise_tokenization():
    ex = {"prompt": "hello", "responses": [" fine", " bad !", " fine fine"], "ranks": [1, 2, 0],
          "scores": [-1.0, -2.0, 0.0], "conversational": 0}  # fmt: skip
    out = tokenize_groupwise(ex, TOK, BIG)
    assert [s.tolist() for s in out["input_ids"]] == [
        [BOS, HELLO, FINE, EOS], [BOS, HELLO, BAD, BANG, EOS], [BOS, HELLO, FINE, FINE, EOS]
    ]  # fmt: skip
    assert [m.tolist() for m in out["completion_mask"]] == [[0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert out["ranks"].tolist() == [1, 2, 0] and out["scores"].dtype == np.float32


def test_sft_forms():
    out = tokenize_sft({"prompt": "", "completion": "hello world", "conversational": 0}, TOK, BIG)
    assert lists(out, "input_ids", "completion_mask") == [[BOS, HELLO, WORLD, EOS], [1, 1, 1, 1]]
    out = tokenize_sft({"prompt": "hello", "completion": " fine", "conversational": 0}, TOK, BIG)
    assert lists(out, "input_ids", "completion_mask") == [[BOS, HELLO, FINE, EOS], [0, 0, 1, 1]]
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "how are you ?"},
        {"role": "assistant", "content": "bad !"},
    ]
    out = tokenize_sft({"prompt": "", "completion": json.dumps(msgs), "conversational": 1}, TOK, BIG)
    ids = [USER, HELLO, END, ASSISTANT, FINE, END, USER, HOW, ARE, YOU, QMARK, END, ASSISTANT, BAD, BANG, END]
    mask = [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]  # assistant turns only, each with its end token
    assert lists(out, "input_ids", "completion_mask") == [ids, mask]
    out = tokenize_sft({"prompt": "", "completion": json.dumps(msgs), "conversational": 1}, TOK,
                       TokenizeConfig(max_length=5, truncation_mode="keep_end"))  # fmt: skip
    assert lists(out, "input_ids", "completion_mask") == [ids[-5:], mask[-5:]]
    with pytest.raises(InvalidRecord, match="no completion token left"):
        tokenize_sft({"prompt": "", "completion": json.dumps(msgs), "conversational": 1}, TOK, TokenizeConfig(4))


def test_prompt_only():
    ex = {"prompt": "how are you ?", "conversational": 0, "extra": '{"answer": "fine"}'}
    out = tokenize_prompt_only(ex, TOK, BIG)
    assert out["prompt_ids"].tolist() == [BOS, HOW, ARE, YOU, QMARK]
    assert out["prompt_text"] == "how are you ?" and out["extra"] == {"answer": "fine"}
    out = tokenize_prompt_only(ex, TOK, TokenizeConfig(max_length=100, max_prompt_length=3))
    assert out["prompt_ids"].tolist() == [ARE, YOU, QMARK]  # keeps the end of the prompt
    msgs = [{"role": "user", "content": "hello"}]
    out = tokenize_prompt_only({"prompt": json.dumps(msgs), "conversational": 1, "extra": "{}"}, TOK, BIG)
    assert out["prompt_ids"].tolist() == [USER, HELLO, END, ASSISTANT] and out["prompt_text"] == msgs


def test_collate_pairwise_bucket_and_padding_rows():
    a = tokenize_pairwise(pairwise("hello world", " fine !", " bad", prob=0.5), TOK, BIG)  # lengths 6, 5
    b = tokenize_pairwise(pairwise("hello", " bad", " fine"), TOK, BIG)  # lengths 4, 4
    a["record_index"], b["record_index"] = np.int32(7), np.int32(3)  # set by the pipeline (source position)
    batch = pipeline.collate_pairwise([a, b], batch_size=3, buckets=(4, 8, 16), pad_id=PAD)
    assert batch["chosen_input_ids"].tolist() == [
        [BOS, HELLO, WORLD, FINE, BANG, EOS, PAD, PAD], [BOS, HELLO, BAD, EOS] + [PAD] * 4, [PAD] * 8
    ]  # fmt: skip
    assert batch["chosen_attention_mask"].tolist() == [[1] * 6 + [0] * 2, [1] * 4 + [0] * 4, [0] * 8]
    assert batch["chosen_completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0], [0] * 8]
    assert batch["rejected_input_ids"].tolist()[0] == [BOS, HELLO, WORLD, BAD, EOS, PAD, PAD, PAD]
    assert batch["rejected_completion_mask"].tolist()[1] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["label_probs"].tolist() == [0.5, 1.0, 1.0] and batch["example_weight"].tolist() == [1, 1, 0]
    assert batch["record_index"].tolist() == [7, 3, -1]
    assert all(v.dtype == np.int32 for k, v in batch.items() if k not in ("label_probs", "example_weight"))
    # Exactly filling a bucket stays in it; one more token moves to the next bucket.
    assert pipeline.bucket_length(4, (4, 8)) == 4 and pipeline.bucket_length(5, (4, 8)) == 8
    with pytest.raises(ValueError, match="longer than the largest length bucket"):
        pipeline.bucket_length(9, (4, 8))


def test_collate_groupwise_and_prompt_only():
    ex = {"prompt": "hello", "responses": [" fine", " bad !"], "ranks": [0, 1], "scores": [1.0, 0.0],
          "conversational": 0}  # fmt: skip
    batch = pipeline.collate_groupwise(
        [tokenize_groupwise(ex, TOK, BIG)], batch_size=2, buckets=(8,), pad_id=PAD, group_size=3
    )
    assert batch["input_ids"].shape == (2, 3, 8)
    assert batch["input_ids"][0, 1].tolist() == [BOS, HELLO, BAD, BANG, EOS, PAD, PAD, PAD]
    assert batch["completion_mask"][0, 0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["attention_mask"][0].sum(-1).tolist() == [4, 5, 0]
    assert batch["ranks"].tolist() == [[0, 1, -1], [-1, -1, -1]]
    assert batch["scores"].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert batch["group_mask"].tolist() == [[1, 1, 0], [0, 0, 0]] and batch["example_weight"].tolist() == [1, 0]

    p1 = tokenize_prompt_only({"prompt": "how are you ?", "conversational": 0, "extra": "{}"}, TOK, BIG)
    p2 = tokenize_prompt_only({"prompt": "hello", "conversational": 0, "extra": '{"a": 1}'}, TOK, BIG)
    batch = pipeline.collate_prompt_only([p1, p2], batch_size=3, buckets=(4, 8), pad_id=PAD)
    assert batch["prompt_ids"].tolist() == [
        [PAD, PAD, PAD, BOS, HOW, ARE, YOU, QMARK], [PAD] * 6 + [BOS, HELLO], [PAD] * 8
    ]  # fmt: skip
    assert batch["prompt_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 6 + [1, 1], [0] * 8]
    assert list(batch["prompt_text"]) == ["how are you ?", "hello", ""]
    assert list(batch["extra"]) == [{}, {"a": 1}, {}] and batch["example_weight"].tolist() == [1, 1, 0]


def test_truncated_flag():
    ex = pairwise("hello world", " fine !", " bad")  # 6 and 5 tokens, prompt 3
    assert tokenize_pairwise(ex, TOK, BIG)["truncated"] is False
    assert tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=6))["truncated"] is False  # exactly fits
    assert tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=5))["truncated"] is True  # chosen loses EOS
    assert tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=100, max_prompt_length=2))["truncated"] is True
    assert tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=100, max_prompt_length=3))["truncated"] is False
    group = {"prompt": "hello", "responses": [" fine", " bad ! !"], "ranks": [0, 1], "scores": [0.0, -1.0],
             "conversational": 0}  # fmt: skip
    assert [tokenize_groupwise(group, TOK, TokenizeConfig(n))["truncated"] for n in (6, 5)] == [False, True]
    sft = {"prompt": "", "completion": "hello world", "conversational": 0}  # 4 tokens
    assert [tokenize_sft(sft, TOK, TokenizeConfig(n))["truncated"] for n in (4, 3)] == [False, True]
    sft = {"prompt": "hello world", "completion": " fine", "conversational": 0}  # prompt 3, total 5
    assert tokenize_sft(sft, TOK, TokenizeConfig(10, max_prompt_length=2))["truncated"] is True
    prompt = {"prompt": "how are you ?", "conversational": 0, "extra": "{}"}  # 5 tokens
    assert [tokenize_prompt_only(prompt, TOK, TokenizeConfig(n))["truncated"] for n in (5, 4)] == [False, True]


def test_chat_template_exception_is_a_bad_example():
    tok = make_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    msgs = [{"role": "system", "content": "hello"}, {"role": "user", "content": "how are you ?"}]
    ex = pairwise(msgs, [{"role": "assistant", "content": "fine"}], [{"role": "assistant", "content": "bad"}], True)
    with pytest.raises(InvalidRecord) as e:
        tokenize_pairwise(ex, tok, BIG)
    assert str(e.value) == (
        "the tokenizer's chat template failed on this conversation: TemplateError: System role not supported; "
        "fix the messages (roles, order) or use a tokenizer whose template accepts them"
    )
    assert tokenize_pairwise(ex, TOK, BIG)["truncated"] is False  # the same example, with a template that accepts it


def test_pair_identical_after_truncation_is_a_bad_example():
    """' fine !' vs ' fine bad': equal up to 4 tokens (BOS + 2 prompt words + ' fine'), so truncated to 4 nothing
    is left to prefer; at 5 they differ (and are still truncated: each loses its EOS)."""
    from align_jax.data.formats import InvalidRecord

    ex = pairwise("hello world", " fine !", " fine bad")
    assert tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=5))["truncated"] is True
    with pytest.raises(InvalidRecord, match="identical after truncation to max_length=4 tokens.*raise data.max_length"):
        tokenize_pairwise(ex, TOK, TokenizeConfig(max_length=4))
