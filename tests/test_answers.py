import pytest

from stages.answers import NO_ANSWER, answers_match, canonical_answer, extract_answer

ORDER = ["answer_is", "hash", "boxed", "last_number"]


@pytest.mark.parametrize("text, answer, extractor", [
    ("5 + 3 = 8. The answer is 8.", "8", "answer_is"),
    ("So she pays $1,200. The final answer is $1,200.", "$1,200", "answer_is"),
    ("Half of 7 is 3.5\n#### 3.5", "3.5", "hash"),
    ("We get \\boxed{\\frac{1}{2}} in the end", "\\frac{1}{2}", "boxed"),
    ("12 - 4 = 8 marbles left", "8", "last_number"),
    ("no digits here", NO_ANSWER, "none"),
])
def test_extractors_in_order(text, answer, extractor):
    found = extract_answer(text, ORDER)
    assert (found.answer, found.extractor) == (answer, extractor)


def test_strict_extractor_wins_over_fallback_and_marks_the_rationale_end():
    text = "She has 5 + 3 = 8 apples. The answer is 8. Then 99 more."
    found = extract_answer(text, ORDER)
    assert found.answer == "8" and found.extractor == "answer_is"
    assert text[:found.start].strip() == "She has 5 + 3 = 8 apples."
    assert extract_answer(text, ["last_number"]).answer == "99"


@pytest.mark.parametrize("pred, gold, same", [
    ("3.0", "3", True), ("$1,200.", "1200", True), ("1,200", "1200", True),
    ("8 apples", "8", True), ("7", "8", False), (NO_ANSWER, "8", False), ("-4", "4", False),
])
def test_numeric_comparison(pred, gold, same):
    assert answers_match(pred, gold, numeric=True) is same


def test_string_comparison_and_canonical_form():
    assert answers_match("Entailment.", "entailment", numeric=False)
    assert not answers_match("neutral", "entailment", numeric=False)
    assert canonical_answer("1,200.0") == "1200"
    assert canonical_answer("0.50") == "0.5"
