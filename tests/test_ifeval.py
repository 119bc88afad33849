"""IFEval-style instruction following (align_jax.evaluation.ifeval): every checker on hand-made responses that
follow and break it (reference semantics of google-research/instruction_following_eval), the loose variants, the
strict / loose prompt- and instruction-level scores on a hand-computed example, the loader's errors (file:line),
and the shipped toy set."""

import json

import pytest

from align_jax.errors import UserError
from align_jax.evaluation import ifeval as I

LT, AL = "less than", "at least"

# (instruction id, kwargs, response, followed?)
CASES = [
    ("length_constraints:number_words", {"relation": LT, "num_words": 5}, "one two three four", True),
    ("length_constraints:number_words", {"relation": LT, "num_words": 5}, "one two three four five", False),
    ("length_constraints:number_words", {"relation": AL, "num_words": 5}, "one two three four five.", True),
    ("length_constraints:number_words", {"relation": AL, "num_words": 5}, "one-two three, four", False),  # 4 words
    ("length_constraints:number_sentences", {"relation": LT, "num_sentences": 3}, "One. Two!", True),
    ("length_constraints:number_sentences", {"relation": LT, "num_sentences": 3}, "One. Two? Three.", False),
    ("length_constraints:number_sentences", {"relation": AL, "num_sentences": 2}, "It rains. We stay in!", True),
    ("length_constraints:number_sentences", {"relation": AL, "num_sentences": 2}, "Dr. J. Smith came at 3.30 p.m. "
     "today.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Trains are fast.\n***\nThey run on rails.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nA.\n***\nB.\n***", True),  # ends ignored
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A.\n***\nB.\n***\nC.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A.\n***\n***\nB.", False),  # empty inside
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "water"},
     "Rivers flow.\n\n\"Water, cold and clear.", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "water"},
     "Rivers flow.\n\nThe water is cold.", False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "water"},
     "Rivers flow.\n\nWater.\n\nMore.", False),  # 3 paragraphs
    ("keywords:existence", {"keywords": ["morning", "energy"]}, "Morning coffee gives me ENERGY.", True),
    ("keywords:existence", {"keywords": ["morning", "energy"]}, "Morning coffee.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["tree", "green"]}, "The streets are wide.", True),  # whole words
    ("keywords:forbidden_words", {"forbidden_words": ["tree", "green"]}, "A tall Tree.", False),
    ("keywords:frequency", {"keyword": "drop", "frequency": 3, "relation": AL}, "drop, Drop, dropping", True),
    ("keywords:frequency", {"keyword": "drop", "frequency": 3, "relation": AL}, "drop after drop", False),
    ("keywords:frequency", {"keyword": "great", "frequency": 2, "relation": LT}, "A great shoe.", True),
    ("keywords:frequency", {"keyword": "great", "frequency": 2, "relation": LT}, "Great shoes, great price.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 4, "let_relation": AL}, "Zany zebras zigzag", True),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 4, "let_relation": AL}, "Zebras zigzag", False),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": LT}, "Hi there", True),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 3, "let_relation": LT}, "Hello there", False),
    # IFEval's data also uses non-letters ("#", "!"): counted as given
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": AL}, "#vote #now", True),
    ("keywords:letter_frequency", {"letter": "!", "let_frequency": 2, "let_relation": AL}, "Ice cream!", False),
    ("detectable_format:json_format", {}, '```json\n{"apple": "red"}\n```', True),
    ("detectable_format:json_format", {}, '  ["a", 1]  ', True),
    ("detectable_format:json_format", {}, '{"apple": "red"', False),
    ("detectable_format:json_format", {}, 'Sure: {"apple": "red"}', False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Tips:\n* Sleep.\n  - Walk.", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n**not a bullet**\n* b", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "- a\n- b\n- c", False),
    ("detectable_format:title", {}, "<<Moon Song>>\nThe moon is bright.", True),
    ("detectable_format:title", {}, "<<   >>\nThe moon is bright.", False),
    ("detectable_format:title", {}, "<<Moon\nSong>> The moon.", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nPack.\nSECTION 2\nGo.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "Section 1\nPack.\nSection 2\nGo.", False),  # case-sensitive
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1 only", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Boil *water*, add *tea*.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Boil *water*, add **tea**.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Add **tea** and * *.", False),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "my answer is yes", False),
    ("change_case:english_lowercase", {}, "summer is warm, 2 weeks off.", True),
    ("change_case:english_lowercase", {}, "Summer is warm.", False),
    ("change_case:english_capital", {}, "GO TEAM, GO 2!", True),
    ("change_case:english_capital", {}, "Go TEAM!", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL}, "I love NASA.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL}, "We love NASA.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LT}, "A calm lake.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LT}, "We DON'T.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. any other questions?"  ', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False),
    ("startend:quotation", {}, '  "Owls can turn their heads far."\n', True),
    ("startend:quotation", {}, 'Owls "hoot".', False),
    ("startend:quotation", {}, '"', False),
    ("punctuation:no_comma", {}, "Pedal and steer.", True),
    ("punctuation:no_comma", {}, "Pedal, then steer.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 3}, "Dear [name], at [place] on [date].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 3}, "Dear [name], at [place].", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. See you soon.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np. s. see you soon.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nPS see you soon.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S. Bye.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. Bye.", False),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "Hi.\nNOTE: bye.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name two planets."}, " name two planets. Mars, Venus.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Name two planets."}, "Mars, Venus. Name two planets.", False),
    ("combination:two_responses", {}, "Rex\n******\nMax", True),
    ("combination:two_responses", {}, "Rex\n******\nRex ", False),
    ("combination:two_responses", {}, "Rex\n******\n******\nMax", False),  # an empty response between
    ("combination:two_responses", {}, "Rex", False),
]


@pytest.mark.parametrize("iid,kwargs,response,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker(iid, kwargs, response, expected):
    assert I.check(iid, response, kwargs) is expected


def test_every_checker_has_a_positive_and_a_negative_case():
    outcomes = {}
    for iid, _, _, expected in CASES:
        outcomes.setdefault(iid, set()).add(expected)
    assert set(outcomes) == set(I.INSTRUCTIONS)
    assert all(v == {True, False} for v in outcomes.values()), outcomes


def test_blank_response_follows_nothing_and_none_kwargs_are_ignored():
    assert I.no_comma("   ") and not I.check("punctuation:no_comma", "   ")
    assert I.check("length_constraints:number_words", "a b", {"relation": LT, "num_words": 3, "keywords": None})
    with pytest.raises(UserError, match="needs a language identifier"):
        I.check("language:response_language", "Bonjour", {"language": "fr"})


def test_word_and_sentence_counts_match_the_reference_cases():
    assert I.count_words("word1, word2, word3, word4.") == 4
    assert I.count_words("\n  Hyphenated-word has two word counts.\n  ") == 6
    for text, n in [("xx,x. xx,x! xx/x. x{x}x? x.", 5), ("xx,x! xxxx. x(x)x?", 3), ("xxxx. xx,x! xx|x. x&x x?", 4),
                    ("xx-x]xx,x! x{x}xx,x.", 2), ("", 0), ("no final stop", 1)]:
        assert I.count_sentences(text) == n, text
    assert I.split_sentences("The U.S.A has many Ph.D. students. They have a .com site.\n") == [
        "The U.S.A has many Ph.D. students.", "They have a .com site."]
    assert I.split_sentences('Mr. Smith said "Hi!" Then... silence. It was odd, etc. So I left. Wait... what?') == [
        'Mr. Smith said "Hi!"', "Then... silence.", "It was odd, etc.", "So I left.", "Wait... what?"]
    assert I.word_tokens("I DON'T like NASA's well-known U.S. (WOW), ok?") == [
        "I", "DO", "N'T", "like", "NASA", "'s", "well-known", "U.S", "WOW", "ok"]


def test_loose_variants_in_reference_order():
    assert I.loose_variants("Sure:\n*a*\nbye") == [
        "Sure:\n*a*\nbye", "Sure:\na\nbye", "*a*\nbye", "Sure:\n*a*", "*a*", "a\nbye", "Sure:\na", "a"]
    rec = I.parse_prompt({"key": 1, "prompt": "p", "instruction_id_list": ["startend:quotation",
                          "detectable_format:json_format", "punctuation:no_comma"], "kwargs": [{}, {}, {}]})
    assert I.follows(rec, 'Here:\n"**{}**"') == [False, False, True]
    assert I.follows(rec, 'Here:\n"**{}**"', loose=True) == [True, True, True]  # first line (and '*') dropped:
    # '"{}"' is also JSON (a string)
    assert I.follows(rec, "Here:\n**{}**", loose=True) == [False, True, True]  # first line and '*' dropped


def test_score_on_a_hand_computed_example():
    records = [
        {"key": 1, "prompt": "a", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
         "kwargs": [{}, {}]},
        {"key": 2, "prompt": "b", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
        {"key": 3, "prompt": "c", "instruction_id_list": ["startend:quotation",
                                                          "detectable_format:number_highlighted_sections"],
         "kwargs": [{}, {"num_highlights": 1}]},
        {"key": 4, "prompt": "d", "instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]},
        {"key": 5, "prompt": "e", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    responses = ["hello, world",  # no_comma fails (every variant), lowercase passes
                 "Sure!\n<<Moon>>\nbody",  # passes
                 'Here you go:\n"the *moon* is bright"',  # quotation passes loose only, highlight passes
                 "**{}**",  # json passes loose only ('*' removed)
                 "   "]  # blank: follows nothing
    got = I.score(records, responses)
    assert got["num_prompts"] == 5 and got["num_instructions"] == 7
    assert got["prompt_level_strict_acc"] == pytest.approx(1 / 5)
    assert got["prompt_level_loose_acc"] == pytest.approx(3 / 5)
    assert got["inst_level_strict_acc"] == pytest.approx(3 / 7)
    assert got["inst_level_loose_acc"] == pytest.approx(5 / 7)
    per = got["per_instruction"]
    assert per["punctuation:no_comma"] == {"count": 2, "strict_acc": 0.0, "loose_acc": 0.0}
    assert per["startend:quotation"] == {"count": 1, "strict_acc": 0.0, "loose_acc": 1.0}
    assert per["detectable_format:json_format"] == {"count": 1, "strict_acc": 0.0, "loose_acc": 1.0}
    assert per["detectable_format:title"]["strict_acc"] == 1.0
    # responses by key give the same scores
    assert I.score(records, {r["key"]: t for r, t in zip(records, responses)}) == got
    with pytest.raises(UserError, match="4 responses for 5 prompts"):
        I.score(records, responses[:4])
    with pytest.raises(UserError, match=r"no response for key\(s\) \[5\]"):
        I.score(records, {1: "", 2: "", 3: "", 4: ""})


def _write(tmp_path, lines):
    path = tmp_path / "input_data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


GOOD = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize("bad,line,match", [
    ('{"key": 2, "prompt": ', 2, "malformed JSON"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["punctuation:no_commas"], "kwargs": [{}]}, 2,
     "unknown instruction id 'punctuation:no_commas' \\(did you mean 'punctuation:no_comma'\\?\\)"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 10, "relation": None}]}, 2, "lacks relation"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 10, "relation": "at most"}]}, 2, "relation must be one of"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["keywords:letter_frequency"],
      "kwargs": [{"letter": "ab", "let_frequency": 2, "let_relation": "at least"}]}, 2, "one character"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
      "kwargs": [{"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}]}, 2,
     "nth_paragraph 3 > num_paragraphs 2"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": 3}]}, 2,
     "unexpected num_words"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, 2,
     "one object per instruction id"),
    ({"prompt": "p", "instruction_id_list": [], "kwargs": []}, 2, "missing field\\(s\\) key"),
    ({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, 2,
     "key 1 is already used at line 1"),
    ({"key": 2, "prompt": "p", "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "fr"}]},
     2, "'language:response_language' is not supported: needs a language identifier"),
])
def test_loader_errors_name_file_and_line(tmp_path, bad, line, match):
    path = _write(tmp_path, [GOOD, "", bad] if line == 3 else [GOOD, bad])
    with pytest.raises(I.IFEvalDataError, match=match) as e:
        I.load_prompts(path)
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert isinstance(e.value, UserError)


def test_loader_reads_hf_nulls_and_can_drop_unsupported(tmp_path):
    hf_kwargs = dict.fromkeys(["num_words", "relation", "keywords", "language", "letter"])
    hf = {"key": 3, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
          "kwargs": [{**hf_kwargs, "num_words": 300.0, "relation": "at least"}]}
    lang = {"key": 4, "prompt": "q", "instruction_id_list": ["language:response_language"],
            "kwargs": [{**hf_kwargs, "language": "kn"}]}
    hashtags = {"key": 5, "prompt": "r", "instruction_id_list": ["keywords:letter_frequency"],
                "kwargs": [{**hf_kwargs, "letter": "#", "let_frequency": 4, "let_relation": "at least"}]}
    path = _write(tmp_path, [GOOD, "", hf, lang, hashtags])
    recs = I.load_prompts(path, drop_unsupported=True)
    assert [r.key for r in recs] == [1, 3, 5]
    assert recs[1].kwargs == ({"num_words": 300, "relation": "at least"},)
    assert recs[2].kwargs == ({"letter": "#", "let_frequency": 4, "let_relation": "at least"},)
    assert recs[1].source == f"{path}:3"
    with pytest.raises(I.IFEvalDataError, match=f"^{path}:4: "):
        I.load_prompts(path)
    with pytest.raises(I.IFEvalDataError, match="no prompts"):
        I.load_prompts(_write(tmp_path, [""]))
    with pytest.raises(I.IFEvalDataError, match="cannot read"):
        I.load_prompts(str(tmp_path / "absent.jsonl"))


def test_shipped_toy_set_loads_and_covers_every_instruction():
    recs = I.load_prompts()  # align_jax/evaluation/data/ifeval_toy.jsonl
    assert 30 <= len(recs) <= 40
    assert {i for r in recs for i in r.instruction_id_list} == set(I.INSTRUCTIONS)
    assert not set(I.INSTRUCTIONS) & set(I.UNSUPPORTED)
    s = I.score(recs, [r.prompt for r in recs])  # echoing the prompt follows some instructions, not all
    assert 0 < s["inst_level_strict_acc"] < 1 and s["inst_level_loose_acc"] >= s["inst_level_strict_acc"]
