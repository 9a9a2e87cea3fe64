"""The filter's checks of one trace, in the order they run; the first that fails is the
trace's reason, counted in the funnel.

A check is any object with the fields of `TraceCheck` registered in `CHECKS`: a new check is
one file in this package (and its setting in `FilterConfig`, declared `UNLESS_DEFAULT` with an
off default so that finished filters stay up to date). It reads a `Trace` and answers None
(passed) or the detail of its drop ("" for none); it may record values in `trace.added`, and
columns of its own (`records`) are added to the filter's shards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol

import pyarrow as pa

from stages.checks.settings import FilterConfig
from pipeline.registry import Registry
from stages.checks.answers import NO_ANSWER, AnswerChecker, Extraction
from stages.checks.arith import check_arithmetic


@dataclass
class Trace:
    """One trace as the checks see it: the generated row, the answer found in it, the answer
    it is checked against (`gold`, None when there is none), and the columns the filter adds
    (`added`, which checks may fill in)."""

    row: dict
    found: Extraction
    marker: bool
    rationale: str
    gold: str | None
    checker: AnswerChecker
    added: dict


class TraceCheck(Protocol):
    name: str                 # the reason a trace it drops gets (counted in the funnel)
    explained: str            # the reason in words (funnel.json, the dataset card)
    order: int                # its place among the checks: smaller runs first
    records: tuple[tuple[str, pa.DataType], ...]  # columns of its own in the filter's shards

    def __call__(self, trace: Trace, cfg: FilterConfig) -> str | None:
        """None when the trace passes, else the detail of the drop ("" for none)."""


CHECKS: Registry = Registry("filter check", "stages.checks")


@dataclass(frozen=True)
class Check:
    """A check made of a function (the built-in ones)."""

    name: str
    explained: str
    order: int
    run: Callable[[Trace, FilterConfig], str | None]
    records: tuple = ()

    def __call__(self, trace: Trace, cfg: FilterConfig) -> str | None:
        return self.run(trace, cfg)


def ordered_checks() -> list[TraceCheck]:
    """The registered checks in the order they run."""
    return sorted(CHECKS, key=lambda c: c.order)


_CALC = re.compile(r"\d\s*[-+*/×x÷^]\s*\(?\$?\d|=\s*-?\$?\d|<<[^>]*>>")
_NUMBERED = re.compile(r"^\s*(?:step\s*\d+|\(?\d{1,2}[.):]\s|[-*•]\s)", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def count_steps(rationale: str) -> int:
    """Reasoning steps: numbered lines ("1.", "Step 2:", a bullet) count one each; in other
    lines, each sentence that carries a calculation (`5 + 3 = 8`, `<<5*3=15>>`) counts."""
    n = 0
    for line in rationale.splitlines():
        if _NUMBERED.match(line):
            n += 1
        elif _CALC.search(line):
            n += sum(1 for part in _SENTENCE.split(line) if _CALC.search(part))
    return n


def repeat_share(words: list[str], n: int) -> float:
    """Share of the word n-grams that repeat an earlier one (0 = none, near 1 = a loop)."""
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def _error(t: Trace, cfg: FilterConfig) -> str | None:
    return str(t.row["error"])[:300] if t.row.get("error") else None


def _right_answer(t: Trace, cfg: FilterConfig) -> str | None:
    question = t.row.get("question") or ""
    if not t.checker.match(t.found.answer, t.gold, question):
        return f"gold {t.gold}"
    t.added["pred_answer"] = t.checker.canonical(t.found.answer)
    return None


def _arithmetic(t: Trace, cfg: FilterConfig) -> str | None:
    if not cfg.check_arithmetic:
        return None
    n_eq, wrong = check_arithmetic(t.rationale)
    t.added["n_equations"] = n_eq
    return None if wrong is None else str(wrong)


def _repetitive(t: Trace, cfg: FilterConfig) -> str | None:
    if cfg.max_repeat_share >= 1.0:
        return None
    share = repeat_share((t.row["completion"] or "").lower().split(), cfg.repeat_ngram)
    t.added["repeat_share"] = round(share, 4)
    if share > cfg.max_repeat_share:
        return f"{share:.0%} of its word {cfg.repeat_ngram}-grams repeat"
    return None


# A hinted trace that says it was handed the answer ("the answer is given as 8", "as the hint
# says", "we are told the answer"): the student, who never sees the hint, would learn to claim
# knowledge it does not have.
_TOLD = re.compile(r"\b(hint|hinted|given answer|answer (?:is |was )?(?:given|provided|told|"
                   r"stated)|(?:we are|we're|i am|i'm|i was|we were) (?:told|given) (?:that )?"
                   r"the answer|(?:told|given) that the answer|as (?:stated|given) in the "
                   r"question|the question says the answer)\b", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")  # what a calculation gives


def _leak(t: Trace, cfg: FilterConfig) -> str | None:
    """A hinted trace (its prompt held the gold answer) that says so, that writes the answer
    before any reasoning step (a number equal to the answer that is not in the question,
    before the first calculation), or whose calculations never reach the answer (a numeric
    answer that is not the result of any `a op b = c` in the rationale: the hint copied, not
    derived). Traces without a hint always pass."""
    if not t.row.get("hinted"):
        return None
    text = t.row["completion"] or ""
    told = _TOLD.search(text)
    if told:
        return f"says it was given the answer: {told.group(0)!r}"
    answer = t.gold if t.gold is not None else t.found.answer
    if answer is None or answer == NO_ANSWER or not t.checker.answers.numeric:
        return None
    key = t.checker.key(answer)
    in_question = {t.checker.key(n) for n in _NUMBER.findall(t.row.get("question") or "")}
    first_step = _CALC.search(text)
    if first_step and key not in in_question:  # (the question's own numbers tell nothing)
        for m in _NUMBER.finditer(text[:first_step.start()]):
            if t.checker.key(m.group(0)) == key:
                return f"states the answer {answer} before any step"
    results = {t.checker.key(m.group(1)) for m in _RESULT.finditer(t.rationale)}
    if key not in results:
        return f"no calculation reaches the answer {answer}: it is only asserted"
    return None


def _too_long(t: Trace, cfg: FilterConfig) -> bool:
    return (cfg.max_tokens is not None and t.added["n_tokens"] > cfg.max_tokens
            or t.added["n_words"] > cfg.max_words)


for _check in (
    Check("generation_error", "the teacher call failed for good (its error is in the trace)",
          10, _error),
    Check("truncated", "cut off by the generation length limit", 20,
          lambda t, cfg: "" if cfg.drop_truncated and t.row["finish_reason"] == "length"
          else None),
    Check("no_answer", "no final answer could be read", 30,
          lambda t, cfg: "" if t.found.answer == NO_ANSWER else None),
    # a distilled student's explain: rationale (distill iterate) is exempt: it learnt the
    # rationale without the teacher's answer sentence, and its answer is read as eval reads it
    Check("no_answer_marker", "only a fallback (a bare last number) found the answer", 40,
          lambda t, cfg: "" if cfg.require_answer_marker and not t.marker
          and t.row.get("sampler") != "student" else None),
    Check("no_consensus", "no gold answer and too few of the row's samples agree on one", 50,
          lambda t, cfg: "" if t.gold is None else None),
    Check("wrong_answer", "the final answer is not the gold (or majority) answer", 60,
          _right_answer),
    Check("hint_leak", "a hinted trace (its prompt held the gold answer) that says it was "
          "given the answer, states it before any reasoning step, or never reaches it by a "
          "calculation", 65, _leak),
    Check("wrong_arithmetic", "a written calculation is wrong, though the final answer may "
          "be right", 70, _arithmetic),
    Check("too_few_steps", "fewer reasoning steps than filter.min_steps", 80,
          lambda t, cfg: "" if t.added["n_steps"] < cfg.min_steps else None),
    Check("too_short", "fewer tokens or words than filter.min_tokens / min_words", 90,
          lambda t, cfg: "" if t.added["n_tokens"] < cfg.min_tokens
          or t.added["n_words"] < cfg.min_words else None),
    Check("too_long", "more tokens or words than filter.max_tokens / max_words", 100,
          lambda t, cfg: "" if _too_long(t, cfg) else None),
    Check("repetitive", "a looping trace: too many repeated word n-grams", 110, _repetitive),
):
    CHECKS.register(_check)
