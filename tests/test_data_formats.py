"""Raw formats, bad-input reporting, implicit prompts, the TFDS builder and HH-RLHF parsing."""

import gzip
import json

import pytest

from align_jax.data import formats
from align_jax.data.builders import build_dataset, load_source
from align_jax.data.formats import DataError, SkipLog, extract_prompt
from align_jax.data.hh_rlhf import build_hh_rlhf, parse_hh_line
from align_jax.data.pipeline import decode_record


def write_jsonl(path, lines):
    """``lines``: JSON values (dumped) or raw str / bytes lines."""
    with open(path, "wb") as f:
        for line in lines:
            if not isinstance(line, (str, bytes)):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def read_all(builder, split="train"):
    src = builder.as_data_source(split)
    return [decode_record(src[i]) for i in range(len(src))]


PAIR = {"prompt": "p", "chosen": "c", "rejected": "r"}
GROUP = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 2, 1]}
USER, BOT = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}]
CONV_PAIR = {"prompt": USER, "chosen": BOT, "rejected": [{"role": "assistant", "content": "no"}]}

# (kind, bad line, reason) -- each bad line sits on line 2 between two good lines.
BAD_CASES = [
    ("pairwise", '{"prompt": "p", "chosen": "c", ', "malformed JSON"),
    ("pairwise", b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}', "invalid UTF-8"),
    ("pairwise", {"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ("pairwise", {"prompt": "p", "chosen": "", "rejected": "r"}, "empty field 'chosen'"),
    ("pairwise", {"prompt": 5, "chosen": "c", "rejected": "r"}, "field 'prompt' must be a string"),
    ("pairwise", {"prompt": "p", "chosen": "c", "rejected": None}, "missing field 'rejected'"),
    ("pairwise", [1, 2], "expected a JSON object"),
    ("pairwise", {**PAIR, "chosen_prob": 1.5}, "'chosen_prob' must be a number in [0, 1]"),
    ("pairwise", {"chosen": "abc", "rejected": "xyz"}, "no common prefix"),
    ("pairwise", {"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "not a {'role', 'content'}"),
    ("groupwise", {**GROUP, "ranks": [0, 1]}, "'ranks' has 2 entries but 'responses' has 3"),
    ("groupwise", {**GROUP, "ranks": [0, 3, 1]}, "is not a ranking of 3 responses"),
    ("groupwise", {**GROUP, "ranks": [1, 2, 2]}, "is not a ranking of 3 responses"),
    ("groupwise", {**GROUP, "ranks": [0, 1.5, 2]}, "'ranks' must be a list of integers"),
    ("groupwise", {**GROUP, "ranks": [0, True, 2]}, "'ranks' must be a list of integers"),
    ("groupwise", {"prompt": "p", "responses": ["a", "b"]}, "missing field 'ranks'"),
    ("groupwise", {"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}, "'scores' has 1 entries"),
    ("sft", {"prompt": "p"}, "missing field 'completion'"),
    ("sft", {"text": ""}, "empty field 'text'"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ("prompt_only", {"question": "p"}, "missing field 'prompt'"),
    # Issue 10: duplicate keys, identical pairs, roles, float32 overflow.
    ("pairwise", '{"prompt": "a", "prompt": "b", "chosen": "c", "rejected": "r"}',
     "duplicate key 'prompt' in a JSON object; keep one value per key"),
    ("pairwise", '{"prompt": "p", "chosen": [{"role": "assistant", "content": "x", "content": "y"}], "rejected": "r"}',
     "duplicate key 'content' in a JSON object"),
    ("pairwise", {"prompt": "p", "chosen": " same", "rejected": "same "},
     "'chosen' and 'rejected' are identical (after prompt extraction, ignoring surrounding whitespace): "
     "a preference needs two different responses; fix or drop the record"),
    ("pairwise", {"chosen": "The sky is blue.", "rejected": "The sky is blue."}, "are identical"),
    ("pairwise", {**CONV_PAIR, "rejected": BOT}, "are identical"),
    ("pairwise", {**CONV_PAIR, "prompt": [{"role": "user", "content": "a"}, {"role": "human", "content": "b"}]},
     "field 'prompt': message 1 has an unknown role 'human' (roles found: user, human); "
     "use one of system, user, assistant, tool"),
    ("pairwise", {**CONV_PAIR, "chosen": USER + BOT},
     "field 'chosen': message 0 has role 'user', not 'assistant' (roles found: user, assistant); "
     "a completion is assistant messages only (earlier turns belong in 'prompt')"),
    ("pairwise", {**CONV_PAIR, "rejected": [{"role": "tool", "content": "x"}]},
     "field 'rejected': message 0 has role 'tool', not 'assistant'"),
    ("groupwise", {"prompt": USER, "responses": [BOT, USER], "ranks": [0, 1]},
     "field 'responses[1]': message 0 has role 'user', not 'assistant'"),
    ("groupwise", {"prompt": "p", "responses": ["a", "b"], "scores": [1e300, 0.0]},
     "'scores'[0] = 1e+300 overflows float32 (largest finite float32: 3.4028235e+38); rescale the scores"),
    ("groupwise", {"prompt": "p", "responses": ["a", "b"], "scores": [0, -3.5e38]}, "'scores'[1] = -3.5e+38 overflows"),
    ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]},
     "field 'messages': message 1 has an unknown role 'gpt' (roles found: user, gpt)"),
    ("prompt_only", {"prompt": [{"role": "System", "content": "q"}]}, "unknown role 'System'"),
]
GOOD = {"pairwise": PAIR, "groupwise": GROUP, "sft": {"text": "t"}, "prompt_only": {"prompt": "p"}}


@pytest.mark.parametrize("kind,bad,reason", BAD_CASES)
def test_bad_example_reported_with_file_and_line(tmp_path, kind, bad, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[kind], bad, GOOD[kind]])
    with pytest.raises(DataError) as e:
        list(formats.read_examples(path, kind, SkipLog("raise")))
    assert str(e.value).startswith(f"{path}:2: ")
    assert reason in str(e.value)

    log = SkipLog("skip")
    examples = list(formats.read_examples(path, kind, log))
    assert [ex["source"] for ex in examples] == [f"{path}:1", f"{path}:3"]
    assert log.num_skipped == 1 and log.reasons[0].startswith(f"{path}:2: ") and reason in log.reasons[0]


def test_duplicate_key_in_json_array_names_its_element(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n'
                    '  {"prompt": "a",\n   "prompt": "b", "chosen": "b", "rejected": "c"},\n'
                    '  {"prompt": "x", "chosen": "y", "rejected": "z"}\n]\n')  # fmt: skip
    with pytest.raises(DataError, match=f"^{path}:3: duplicate key 'prompt' in a JSON object; keep one value per key$"):
        list(formats.read_examples(str(path), "pairwise", SkipLog()))
    log = SkipLog("skip")
    assert [e["source"] for e in formats.read_examples(str(path), "pairwise", log)] == [f"{path}:2", f"{path}:5"]
    assert log.num_skipped == 1


@pytest.mark.parametrize("content,what", [
    ("", "the file is empty (or only blank lines)"),
    ("\n\n  \n", "the file is empty (or only blank lines)"),
    (" [ ]\n", "the file is an empty JSON array"),
])  # fmt: skip
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_empty_file_is_refused_with_its_name(tmp_path, content, what, mode):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        build_dataset(str(path), kind="pairwise", data_dir=str(tmp_path / "tfds"), on_bad_example=mode)
    assert str(e.value) == f"{path}: no examples: {what}"


def test_file_with_only_bad_records_is_refused(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [PAIR])
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}, "{nope"])
    with pytest.raises(DataError) as e:
        build_dataset([good, path], kind="pairwise", data_dir=str(tmp_path / "tfds"), on_bad_example="skip")
    assert str(e.value) == (
        f"no usable example in {path}: 2 records, all bad; first: {path}:1: missing field 'chosen'; "
        "fix the file, or check that its records have the fields of kind='pairwise'"
    )


def test_build_is_quiet_and_says_what_it_builds(tmp_path, capfd, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", [PAIR])
    with caplog.at_level("INFO", logger="align_jax.data.builders"):
        builder, _ = build_dataset(path, kind="pairwise", data_dir=str(tmp_path / "tfds"))
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out + err and "downloaded and prepared" not in out + err
    assert "Generating" not in out + err and "Using custom data configuration" not in caplog.text
    ours = [r.getMessage() for r in caplog.records if r.name == "align_jax.data.builders"]
    assert ours == [f"building dataset from {path} -> {builder.data_dir}"]


def test_build_raise_and_skip_counts(tmp_path):
    bad = [b for k, b, _ in BAD_CASES if k == "pairwise"]
    lines = [{**PAIR, "prompt": f"p{i}"} for i in range(3)] + bad + [{**PAIR, "prompt": "last"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with pytest.raises(DataError, match=f"^{path}:4: malformed JSON"):
        build_dataset(path, kind="pairwise", data_dir=str(tmp_path / "tfds"))
    builder, stats = build_dataset(path, kind="pairwise", data_dir=str(tmp_path / "tfds"), on_bad_example="skip")
    assert stats.num_skipped == len(bad) and stats.num_examples == {"train": 4}
    assert stats.skipped_reasons[0].startswith(f"{path}:4: ") and stats.skipped_reasons[2].startswith(f"{path}:6: ")
    assert [r["prompt"] for r in read_all(builder)] == ["p0", "p1", "p2", "last"]
    # The cached dataset keeps its stats, and refuses raise mode since it skipped examples.
    _, again = build_dataset(path, kind="pairwise", data_dir=str(tmp_path / "tfds"), on_bad_example="skip")
    assert again == stats
    with pytest.raises(DataError, match=f"^{path}:4: .*skipped {len(bad)} examples"):
        build_dataset(path, kind="pairwise", data_dir=str(tmp_path / "tfds"))


def test_json_array_line_numbers(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(
        '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n'
        '  {"prompt": "a",\n   "chosen": "b"},\n'
        '  {"prompt": "x", "chosen": "y", "rejected": "z"}\n]\n'
    )
    with pytest.raises(DataError, match=f"^{path}:3: missing field 'rejected'"):
        list(formats.read_examples(str(path), "pairwise", SkipLog()))
    log = SkipLog("skip")
    assert [e["source"] for e in formats.read_examples(str(path), "pairwise", log)] == [f"{path}:2", f"{path}:5"]
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b" "c"}\n]')
    with pytest.raises(DataError, match=f"^{path}:3: malformed JSON"):  # syntax errors in arrays always raise
        list(formats.read_examples(str(path), "prompt_only", SkipLog("skip")))


def test_build_jsonl_and_json_array_read_back_exactly(tmp_path):
    conv_prompt = [{"role": "user", "content": "héllo ✓"}]
    records = [
        {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5", "chosen_prob": 0.75},
        {"prompt": conv_prompt, "chosen": [{"role": "assistant", "content": "hi"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    ]  # fmt: skip
    expected = [
        {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5", "chosen_prob": 0.75, "conversational": 0},
        {"prompt": json.dumps(conv_prompt, ensure_ascii=False),
         "chosen": json.dumps([{"role": "assistant", "content": "hi"}]),
         "rejected": json.dumps([{"role": "assistant", "content": "go away"}]),
         "chosen_prob": 1.0, "conversational": 1},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "chosen_prob": 1.0, "conversational": 0},
    ]  # fmt: skip
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    array = tmp_path / "b.json"
    array.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    builder, stats = build_dataset(
        {"train": jsonl, "test": str(array)}, kind="pairwise", data_dir=str(tmp_path / "tfds")
    )
    assert stats.num_examples == {"train": 3, "test": 3} and stats.num_skipped == 0
    train = read_all(builder, "train")
    assert train == [{**e, "source": f"{jsonl}:{i + 1}"} for i, e in enumerate(expected)]
    test = read_all(builder, "test")
    assert [{k: v for k, v in r.items() if k != "source"} for r in test] == expected
    starts = [i + 1 for i, line in enumerate(array.read_text().splitlines()) if line.startswith("  {")]
    assert len(starts) == 3 and [r["source"] for r in test] == [f"{array}:{n}" for n in starts]
    # The same data through the directory loader.
    src = load_source(builder.data_dir, "test")
    assert decode_record(src[2]) == test[2]


def test_groupwise_sft_prompt_only_records(tmp_path):
    group = write_jsonl(tmp_path / "g.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 1, 3]},
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.5, 2, 0.5]},
    ])  # fmt: skip
    builder, _ = build_dataset(group, kind="groupwise", data_dir=str(tmp_path / "tfds"))
    rows = read_all(builder)
    assert rows[0]["ranks"] == [0, 1, 1, 3] and rows[0]["scores"] == [0.0, -1.0, -1.0, -3.0]
    assert rows[1]["ranks"] == [1, 0, 1] and rows[1]["scores"] == [0.5, 2.0, 0.5]
    assert rows[1]["responses"] == ["a", "b", "c"]

    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    sft = write_jsonl(tmp_path / "s.jsonl", [{"messages": msgs}, {"prompt": "p", "completion": "c"}, {"text": "t"}])
    builder, _ = build_dataset(sft, kind="sft", data_dir=str(tmp_path / "tfds"))
    assert [(r["prompt"], r["completion"], r["conversational"]) for r in read_all(builder)] == [
        ("", json.dumps(msgs), 1), ("p", "c", 0), ("", "t", 0)
    ]  # fmt: skip

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    builder, _ = build_dataset(prompts, kind="prompt_only", data_dir=str(tmp_path / "tfds"))
    assert read_all(builder)[0]["extra"] == '{"answer": "4"}'


def test_extract_prompt_like_trl():
    # String form: the common prefix, with the space before the divergence moved to the completions.
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    # TRL's quirk when one is a prefix of the other: split at min_len - 1.
    assert extract_prompt("abc", "abcd") == ("ab", "c", "cd")
    # Conversational form: the common message prefix.
    user = {"role": "user", "content": "What color is the sky?"}
    blue, green = {"role": "assistant", "content": "blue"}, {"role": "assistant", "content": "green"}
    assert extract_prompt([user, blue], [user, green]) == ([user], [blue], [green])
    # Through the parser; a text prompt next to conversational chosen/rejected is replaced (maybe_extract_prompt).
    rec = formats.parse_pairwise({"prompt": "ignored", "chosen": [user, blue], "rejected": [user, green]})
    assert json.loads(rec["prompt"]) == [user] and json.loads(rec["chosen"]) == [blue]
    assert rec["conversational"] == 1


def test_ranks_validation():
    assert formats.valid_ranks([0, 1, 1, 2]) and formats.valid_ranks([0, 1, 1, 3]) and formats.valid_ranks([2, 0, 1])
    assert not formats.valid_ranks([0, 2, 2, 2]) and not formats.valid_ranks([1, 1]) and not formats.valid_ranks([0, 4])
    assert formats.competition_ranks([0.5, 2.0, 0.5, -1.0]) == [1, 0, 1, 3]


H, A = "\n\nHuman: ", "\n\nAssistant: "
HH_LINES = [
    {"chosen": f"{H}Hi there{A}Hello! How can I help?{H}Tell me a joke{A}Why did the chicken cross the road?",
     "rejected": f"{H}Hi there{A}Hello! How can I help?{H}Tell me a joke{A}No."},
    {"chosen": f"{H}What is 2+2?{A}It is 4.", "rejected": f"{H}What is 2+2?{A}It is 5."},
]  # fmt: skip


def test_hh_rlhf_parsing():
    rec = parse_hh_line(HH_LINES[0])
    assert json.loads(rec["prompt"]) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert json.loads(rec["chosen"]) == [{"role": "assistant", "content": "Why did the chicken cross the road?"}]
    assert json.loads(rec["rejected"]) == [{"role": "assistant", "content": "No."}]
    # The common start "...Assistant: It is " is cut back to the last "\n\nAssistant: " (TRL's extract_dialogue).
    rec = parse_hh_line(HH_LINES[1])
    assert json.loads(rec["prompt"]) == [{"role": "user", "content": "What is 2+2?"}]
    assert json.loads(rec["chosen"])[0]["content"] == "It is 4."
    raw = parse_hh_line(HH_LINES[1], style="raw")
    assert raw["prompt"] == f"{H}What is 2+2?\n\nAssistant:"
    assert (raw["chosen"], raw["rejected"]) == (" It is 4.", " It is 5.")
    with pytest.raises(formats.InvalidRecord, match="does not start with the prompt"):
        parse_hh_line({"chosen": f"{H}a{A}b", "rejected": f"{H}x{A}y"}, style="raw")


def test_hh_rlhf_builder(tmp_path):
    hh = tmp_path / "hh"
    (hh / "helpful-base").mkdir(parents=True)
    (hh / "harmless-base").mkdir()
    with gzip.open(hh / "helpful-base" / "train.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(x) + "\n" for x in HH_LINES))
    bad = {"chosen": "no turns here", "rejected": "nor here"}
    write_jsonl(hh / "harmless-base" / "train.jsonl", [HH_LINES[1], bad])
    write_jsonl(hh / "helpful-base" / "test.jsonl", [HH_LINES[0]])
    bad_where = f"{hh / 'harmless-base' / 'train.jsonl'}:2"
    with pytest.raises(DataError, match=f"^{bad_where}: no "):
        build_hh_rlhf(str(hh), data_dir=str(tmp_path / "tfds"))
    builder, stats = build_hh_rlhf(str(hh), data_dir=str(tmp_path / "tfds"), on_bad_example="skip")
    assert stats.num_examples == {"train": 3, "test": 1} and stats.num_skipped == 1
    assert stats.skipped_reasons[0].startswith(bad_where)
    rows = read_all(builder)
    # harmless-base comes first (SUBSETS order), then the gzipped helpful-base file.
    assert [r["source"].rsplit("/", 2)[-2:] for r in rows] == [
        ["harmless-base", "train.jsonl:1"], ["helpful-base", "train.jsonl.gz:1"], ["helpful-base", "train.jsonl.gz:2"]
    ]  # fmt: skip
    assert all(r["conversational"] == 1 for r in rows)
    assert json.loads(rows[0]["rejected"]) == [{"role": "assistant", "content": "It is 5."}]


def test_a_build_finished_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    """Two processes building the same dataset at once (e.g. `--jobs=2` of an experiment): the second one's rename
    finds the first one's finished directory (TFDS raises FileExistsError); it uses that build (same content
    fingerprint) instead of failing."""
    from align_jax.data import builders

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3)))
    real = builders.AlignJaxData.download_and_prepare
    calls = []

    def racing(self, *a, **k):  # the other process wins: the dataset is complete when this one renames
        calls.append(1)
        real(self, *a, **k)
        if len(calls) == 1:
            raise FileExistsError(f"Cannot rename ... Destination {self.data_dir} already exists.")

    monkeypatch.setattr(builders.AlignJaxData, "download_and_prepare", racing)
    builder, stats = build_dataset(str(path), kind="pairwise", data_dir=str(tmp_path / "tfds"))
    assert len(calls) == 2 and stats.num_examples["train"] == 3
    assert len(builder.as_data_source("train")) == 3
