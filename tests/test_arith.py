"""The arithmetic check: every `a op b = c` and <<a*b=c>> in a rationale, without eval."""

import json
from pathlib import Path

import pytest

from stages.checks.arith import ParseError, check_arithmetic, evaluate

GSM8K = Path(__file__).resolve().parents[2] / "shared/datasets/gsm8k/train.jsonl"


@pytest.mark.parametrize("expr, value", [
    ("48/2", 24), ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("-3 + 5", 2), ("2^3", 8),
    ("20% * 50", 10), ("1,200 + 300", 1500), ("3 x 4", 12), ("10 ÷ 4", 2.5), ("$10 + $5", 15),
])
def test_evaluate(expr, value):
    assert evaluate(expr) == pytest.approx(value)


@pytest.mark.parametrize("expr", ["__import__('os')", "2 +", "x + 1", "1/0", "2 ** 99999",
                                  "07:30 - 1", "(1 + 2", "2^1000"])
def test_evaluate_refuses_what_is_not_plain_arithmetic(expr):
    with pytest.raises((ParseError, ValueError, OverflowError)):
        evaluate(expr)


# real GSM8K human solutions (train split), right as written
RIGHT = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
    "clips altogether in April and May.\n#### 72",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 "
    "= $<<0.2*50=10>>10.\n#### 10",
    "The 25 decorations were 1/3 of the total decorations, so he used 25 / 1/3 = 75 total "
    "decorations",
    "To carry 17 objects, three at a time, it takes 17/3 = 5 and 2/3 loads",
    "So in a month, he uses 600 x 30 = 18 000 watts",
    "So, Bea earned $2.50 - $2.24 = 26 cents more than Dawn.",
    "The proportions totals 2.46 because .8 + . 84 + .82 = <<.8+.84+.82=2.46>>2.46",
    "Thus the Coffee table price is $2,430 – ($1,250 + $850) = $2,430 – $2,100 = $ 330",
    "The garden produced 237 potatoes - 60 = <<237-60=177>>177 cucumbers.",
    "There are 15 cups of lemonade in the pitcher because 12 x 1 and 1/4 = 15",
    "10 / 3 = 3.33 each, and 3/4 = 75% of it",
]


@pytest.mark.parametrize("text", RIGHT)
def test_right_arithmetic_passes(text):
    checked, wrong = check_arithmetic(text)
    assert wrong is None, str(wrong)


# wrong intermediate arithmetic behind a right final answer (the first two are GSM8K's own)
WRONG = [
    ("Jerry took 2*8 = 24 hours fixing the broken kitchen counter", "2*8 = 24 (it is 16)"),
    ("She made 52 bracelets but gave 8 away so she had 50-8 = <<52-8=44>>44 bracelets left.",
     "50-8 = 44 (it is 42)"),
    ("She has 5 + 3 = 9 apples, then gives 1 away: 9 - 1 = 8.\nThe answer is 8.",
     "5 + 3 = 9 (it is 8)"),
    ("He pays <<12*3=38>>38 dollars", "12*3 = 38 (it is 36)"),
]


@pytest.mark.parametrize("text, message", WRONG)
def test_wrong_arithmetic_is_found_even_with_a_right_answer(text, message):
    checked, wrong = check_arithmetic(text)
    assert wrong is not None and str(wrong) == message


def test_what_is_not_an_equation_is_skipped():
    for text in ["x = 3 + 4", "2x + 3 = 7", "1 hour = 60 minutes", "He left at 0900-0130 = 0730",
                 "Let B be the apples: 79 - B - 26 = 8", "20 eggs * 40% = 8 eggs"]:
        assert check_arithmetic(text)[1] is None, text


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/datasets/gsm8k is not present")
def test_gsm8k_human_solutions_are_almost_all_right():
    data = [json.loads(line) for line in GSM8K.open()]
    results = [check_arithmetic(d["answer"]) for d in data]
    wrong = sum(1 for _, w in results if w is not None)
    assert sum(n for n, _ in results) > 40000  # about six equations per solution are checked
    assert wrong / len(data) < 0.005, wrong
