"""Answer parsing (multiple choice, MME-RealWorld's official rule) and the VQA answer normalisation."""

from __future__ import annotations

import pytest

from vila_hd.eval.answers import (
    VQA_CONTRACTIONS,
    lmms_eval_mcq_letter,
    lmms_eval_vstar_letter,
    mme_realworld_official_letter,
    normalize_vqa_answer,
    parse_choice,
    realworldqa_legacy_prediction,
    vlmevalkit_can_infer,
)
from vila_hd.eval.metrics import open_answer_score, percentile, vqa_soft_accuracy

OPTIONS = {"A": "blue", "B": "red", "C": "green", "D": "yellow"}

# (reply as models write it, expected letter or None, rule that decides it)
PHRASINGS = [
    ("B", "B", "bare"),
    ("B.", "B", "bare"),
    ("(B)", "B", "bare"),
    ("(b)", "B", "bare"),
    ("b", "B", "bare"),
    ("**B**", "B", "bare"),
    ("  C\n", "C", "bare"),
    ("Answer: B", "B", "statement"),
    ("Answer: (C) green", "C", "statement"),
    ("The answer is B.", "B", "statement"),
    ("The answer is (D)", "D", "statement"),
    ("The correct answer is option C.", "C", "statement"),
    ("The best answer is: A", "A", "statement"),
    ("My answer: c", "C", "statement"),
    ("the answer is B because the car in the corner is red", "B", "statement"),
    ("Option B", "B", "statement"),
    ("Choice (D)", "D", "statement"),
    ("I choose C.", "C", "statement"),
    ("I would go with D", "D", "statement"),
    ("C is correct", "C", "statement"),
    ("(C) is the right answer.", "C", "statement"),
    ("The letter of the correct option is D.", "D", "statement"),
    ("The answer is B, not C.", "B", "statement"),
    ("Answer: B\nExplanation: option A is wrong because the car is red.", "B", "statement"),
    ("Option A is wrong; the answer is C.", "C", "statement"),
    ("Based on the image, the answer is C", "C", "statement"),
    ("<think>Could be A... no.</think>\nThe answer is D", "D", "statement"),
    ("B) red", "B", "leading"),
    ("B. red", "B", "leading"),
    ("B: the red one", "B", "leading"),
    ("D - the yellow one", "D", "leading"),
    ("B. red, because (A) is darker", "B", "leading"),
    ("B red", "B", "leading"),
    ("I think (C) fits best.", "C", "parenthesised"),
    ("red", "B", "option_text"),
    ("Yellow.", "D", "option_text"),
    ("The car is green.", "C", "option_text"),
    ("It's B, I think", "B", "standalone"),
    ("答案是B", "B", "standalone"),
    ("", None, "unparsed"),
    ("I'm not sure.", None, "unparsed"),
    ("I cannot tell from this image.", None, "unparsed"),
    ("E", None, "unparsed"),  # not one of the options
    ("The answer is E", None, "unparsed"),
    ("Both A and B", None, "ambiguous"),
    ("(A) blue (B) red", None, "ambiguous"),
    ("A. blue\nB. red\nC. green", None, "ambiguous"),
    ("It is either red or blue.", None, "ambiguous"),
]


@pytest.mark.parametrize("reply, letter, rule", PHRASINGS)
def test_parse_choice_reads_real_world_phrasings(reply, letter, rule):
    parsed = parse_choice(reply, OPTIONS)
    assert (parsed.letter, parsed.rule) == (letter, rule)
    assert parsed.parsed == (letter is not None)


def test_leading_article_is_not_a_choice():
    # "A" starting a sentence is an article; the option text decides
    assert parse_choice("A man stands on the left.", {"A": "right", "B": "left"}).letter == "B"
    assert parse_choice("A left", {"A": "left", "B": "right"}).letter == "A"  # letter followed by its own text
    assert parse_choice("A man is here", OPTIONS).letter is None


def test_option_text_prefers_the_longest_matching_option():
    assert parse_choice("It's dark red", {"A": "red", "B": "dark red"}).letter == "B"
    assert parse_choice("red", {"A": "red", "B": "dark red"}).letter == "A"


def test_valid_letters_come_from_the_options():
    two = ["left", "right"]  # a list is lettered A, B
    assert parse_choice("C", two).letter is None
    assert parse_choice("B", two).letter == "B"
    assert parse_choice("right", two).letter == "B"
    assert parse_choice("D", letters="ABCD").letter == "D"  # letters only, no option texts


def test_mme_realworld_official_rule_keeps_its_quirks():
    choices = ["(A) x", "(B) y", "(C) z", "(D) w", "(E) v"]
    assert mme_realworld_official_letter("", choices) == "A"  # empty reply matches the first choice
    assert mme_realworld_official_letter("Based on the image it is C", choices) == "B"  # first capital A-E
    assert mme_realworld_official_letter("The best answer is C", choices) == "C"  # prefix removed
    assert mme_realworld_official_letter("Answer: E", choices) == "A"  # "Answer:" is not a listed prefix
    assert mme_realworld_official_letter("y", choices) == "B"  # reply text inside a choice
    many_words = "there is no way to tell which one of these it is from this picture"
    assert mme_realworld_official_letter(many_words, choices) == ""  # > 10 words and no capital A-E


# lmms-eval's vstar_bench extract_answer_letter (EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/vstar_bench/utils.py,
# commit 75571cf): the reply is upper-cased, then the first matching pattern wins.
VSTAR_LMMS_EVAL = [
    ("B", "B"), ("(c)", "C"), ("b.", "B"),
    ("Answer: B", "A"),  # "ANSWER: B" starts with A
    ("A man holds it", "A"),
    ("Based on the image, C", "B"),  # starts with B
    ("The answer is C", "C"),  # "ANSWER IS C"
    ("I think (D) fits", "D"),
    ("The cup is red.", "D"),  # D followed by "."
    ("It is the white one", None),  # no A-D at all
    ("The glove is leather", "A"),  # the only A-D character
    ("E", None),  # only A-D count
    ("", None),
]


@pytest.mark.parametrize("reply, letter", VSTAR_LMMS_EVAL)
def test_lmms_eval_vstar_rule_keeps_its_quirks(reply, letter):
    assert lmms_eval_vstar_letter(reply) == letter


# VLMEvalKit can_infer (open-compass/VLMEvalKit, vlmeval/utils/matching_util.py, commit e8e78f0)
CAN_INFER = [
    ("B", "B"), ("(B) red", "B"), ("**C**", "C"),
    ("b", None),  # a lower-case letter is not an option token, and "b" contains no option text
    ("red", "B"),  # the text step
    ("It must be the dark red one", None),  # "red" and "dark red" both inside: no single text
    ("B is wrong but not as wrong as C", None),  # two option letters
    ("The answer is C, because the tag on the left shows it clearly", "C"),  # C too early; "answer is C"
    ("the answer is a red car", "A"),  # the verbose pattern is case-insensitive
    ("Z", "Z"),
    ("Cannot determine the answer", "Z"),
    ("Failed to obtain answer via API: red", "B"),  # no letter step for API failures, but the text step runs
]


@pytest.mark.parametrize("reply, letter", CAN_INFER)
def test_vlmevalkit_can_infer_keeps_its_quirks(reply, letter):
    assert vlmevalkit_can_infer(reply, {"A": "blue", "B": "red", "C": "dark red", "D": "yellow"}) == letter


# lmms-eval extract_mcq_answer (lmms_eval/tasks/_task_utils/mcq_extract.py, commit 75571cf)
MCQ_LMMS_EVAL = [
    ("B", "B"), ("(B).", "B"), ("The answer is (A).", "A"),
    ("A is wrong, C is right", "A"),  # "starts with A" outranks everything
    ("I pick D", "D"),  # ends with D (9)
    ("Between B. and C.", "C"),  # same priority (period): the later one
    ("Right.", ""), ("b", ""), ("", ""),
]


@pytest.mark.parametrize("reply, letter", MCQ_LMMS_EVAL)
def test_lmms_eval_mcq_extractor(reply, letter):
    assert lmms_eval_mcq_letter(reply, "ABCD") == letter


def test_realworldqa_legacy_filters():
    # lmms_eval/tasks/realworldqa/utils.py before commit 9ca4445: NumberWordsToDigitsFilter, MultiChoiceRegexFilter
    question = "Is it on?\nA. Yes\nB. No\nPlease answer directly with only the letter of the correct option."
    assert realworldqa_legacy_prediction("No.", question) == "B"
    assert realworldqa_legacy_prediction("Not sure", question) == "B"  # "No" inside "Not"
    assert realworldqa_legacy_prediction("yes", question) == "yes"  # case-sensitive search
    assert realworldqa_legacy_prediction("Three", "How many?\nAnswer.") == "3"
    assert realworldqa_legacy_prediction("(B)", "How many?") == "B"


VQA_NORMALISATION = [
    ("Two", "2"),
    ("the dog's bone.", "dog 's bone"),
    ("3.5", "3.5"),
    ("Coca-Cola", "coca cola"),
    ("a - b", "b"),  # '-' touching a space is deleted; the article goes
    ("yes!", "yes"),
    ("hello, world", "hello world"),
    ("1,000", "1000"),
    ("Don't", "don't"),
    ("dont", "don't"),
    ("couldnt've", "couldn't've"),
    ("shes", "shes"),  # not restored by the official table
    ("ten dollars.", "10 dollars"),
    ("An apple\tand\nthe pear", "apple and pear"),
    ("none", "0"),
    ("(stop)", "stop"),
    ("e.g. this", "eg this"),
]


@pytest.mark.parametrize("raw, normalised", VQA_NORMALISATION)
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_contraction_table_matches_the_evalai_entries():
    assert VQA_CONTRACTIONS["ow's'at"] == "'ow's'at" and VQA_CONTRACTIONS["'ows'at"] == "'ow's'at"
    assert VQA_CONTRACTIONS["yall'd've"] == "y'all'd've" and "yalldve" not in VQA_CONTRACTIONS
    assert VQA_CONTRACTIONS["twas"] == "'twas" and VQA_CONTRACTIONS["oclock"] == "o'clock"
    assert "its" not in VQA_CONTRACTIONS and "im" not in VQA_CONTRACTIONS


def test_vqa_soft_accuracy_leave_one_out():
    others = [f"x{i}" for i in range(10)]
    for matches, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["red"] * matches + others[: 10 - matches]
        assert vqa_soft_accuracy("Red.", answers) == pytest.approx(expected)
    assert vqa_soft_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0  # both sides normalised
    with pytest.raises(ValueError):
        vqa_soft_accuracy("x", [])


def test_open_answer_metrics():
    assert open_answer_score("The sign says STOP.", ["stop"], "contains") == 1.0
    assert open_answer_score("The sign says STOP.", ["stop"], "exact") == 0.0
    assert open_answer_score("Stop", ["stop", "halt"], "exact") == 1.0
    assert open_answer_score("stopping", ["stop"], "contains") == 0.0  # whole words only
    with pytest.raises(ValueError, match="unknown open-answer metric"):
        open_answer_score("x", ["x"], "fuzzy")


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(8.8)
    assert percentile([], 50) is None
