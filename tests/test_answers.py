import pytest

from stages.checks.answers import NO_ANSWER, AnswerChecker, extract_answer

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
    assert AnswerChecker("numeric").match(pred, gold) is same


def test_string_comparison_and_canonical_form():
    text = AnswerChecker("string")
    assert text.match("Entailment.", "entailment") and not text.match("neutral", "entailment")
    assert AnswerChecker("numeric").canonical("1,200.0") == "1200"
    assert AnswerChecker("numeric").canonical("0.50") == "0.5"


# ---- answer kinds ------------------------------------------------------------------------

from stages.checks.answers import format_number, parse_options, to_number  # noqa: E402


@pytest.mark.parametrize("text, answer, extractor", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72", "hash"),
    ("so x = 3.\nAnswer: 3", "3", "answer_colon"),
    ("**Final Answer**: 12 apples", "12 apples", "answer_colon"),
    ("the answer is 15 gallons * 8 pints = 120 pints\n#### 120", "120", "hash"),
])
def test_numeric_order_reads_the_strictest_marker(text, answer, extractor):
    found = AnswerChecker("numeric").extract(text)
    assert (found.answer, found.extractor) == (answer, extractor)


@pytest.mark.parametrize("text, value", [
    ("$1,200.50", "1200.5"), ("3/4", "0.75"), ("\\frac{3}{4}", "0.75"), ("1 1/2 cups", "1.5"),
    ("-2.5 kg", "-2.5"), ("50%", "50"), (".5", "0.5"), ("no number", None),
])
def test_numbers_from_answer_strings(text, value):
    n = to_number(text)
    assert (format_number(n) if n is not None else None) == value


def test_numeric_tolerance_fractions_and_canonical_forms():
    c = AnswerChecker("numeric")
    assert c.match("0.75", "3/4") and c.match("\\frac{1}{2}", "0.5") and c.match("$5.", "5")
    assert not c.match("0.33", "1/3")
    assert AnswerChecker("numeric", tolerance=0.02).match("0.33", "1/3")
    assert c.canonical("1/3") == "1/3" and c.canonical("$1,200.0") == "1200"
    assert format_number(to_number("2.50")) == "2.5"


def test_math_answers_go_through_math_verify():
    c = AnswerChecker("math")
    found = c.extract("So the area is $\\frac{\\sqrt{2}}{2}$, i.e. \\boxed{\\frac{1}{\\sqrt{2}}}")
    assert found.extractor == "boxed" and found.answer == "\\frac{1}{\\sqrt{2}}"
    assert c.match(found.answer, "\\frac{\\sqrt{2}}{2}")
    assert c.match("x^2 + 2x + 1", "(x+1)^2")
    assert not c.match("\\frac{1}{3}", "\\frac{1}{2}")
    assert c.match("0.5", "1/2")


def test_multiple_choice_letters_and_option_text():
    q = ("Where would you find a jellyfish? (A) desert (B) store (C) ocean (D) library "
         "(E) kitchen")
    assert parse_options(q)["C"] == "ocean"
    c = AnswerChecker("choice")
    for text, letter, how in [("The answer is (C).", "C", "answer_is:letter"),
                              ("Answer: c", "C", "answer_colon:letter"),
                              ("They live in the sea. The answer is ocean.", "C",
                               "answer_is:option_text"),
                              ("Jellyfish live in the ocean, so (C)", "C", "last_letter:letter")]:
        found = c.extract(text, q)
        assert (found.answer, found.extractor) == (letter, how), text
        assert c.match(found.answer, "C", q) and c.match(found.answer, "ocean", q)
    assert c.extract("The answer is somewhere.", q).answer == NO_ANSWER


def test_class_labels_as_in_esnli():
    c = AnswerChecker("label")
    assert c.extract("A man sleeping cannot be running. The answer is contradiction.").answer \
        == "contradiction"
    assert c.extract("The premise entails the hypothesis.").answer == "entailment"
    assert c.extract("Answer: Neutral").answer == "neutral"
    # naming two labels is no answer
    assert c.extract("It is neutral or a contradiction.").answer == NO_ANSWER
    assert c.match("entailment", "Entailment")
    yes_no = AnswerChecker("label", labels=["yes", "no"])
    assert yes_no.extract("The answer is yes.").answer == "yes"
