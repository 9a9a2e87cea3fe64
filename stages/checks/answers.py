"""Final-answer extraction and comparison, shared by the filter and the evaluation.

A trace's answer is found in two steps: a *span* extractor finds where the final answer is
written (`#### N`, `\\boxed{...}`, "The answer is ...", "Answer: ...", or a fallback such as
the last number), tried in a configured order, strict ones first; then the answer kind (an
`AnswerKind` class registered under its name; a new one is one file in this package) reads
the span:

- `numeric`: a number, with commas, currency, units, percent signs, fractions (`3/4`,
  `\\frac{3}{4}`, `1 1/2`) and decimals, compared with a relative tolerance;
- `math`: LaTeX or symbolic answers, compared through `math-verify` (numbers first, fast);
- `choice`: a multiple-choice letter, written as the letter (`(B)`, `B.`) or as the option's
  text, which is mapped back to its letter through the options in the question;
- `label`: one of a fixed set of class labels (e-SNLI/ANLI: entailment, neutral,
  contradiction), also written as a verb form ("entails", "contradicts");
- `string`: the normalised text.

The extractor that matched is recorded (`hash`, `answer_is:option_text`, ...). No match gives
the sentinel `NO_ANSWER`, never an empty label.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from pipeline.config import Config, answer_kind
from pipeline.registry import ANSWER_KINDS, EXTRACTORS as EXTRACTOR_REGISTRY

NO_ANSWER = "[no answer]"
DEFAULT_LABELS = ["entailment", "neutral", "contradiction"]

_NUM = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_NUMBER = re.compile(_NUM)


@dataclass(frozen=True)
class Extraction:
    answer: str          # the extracted answer text, or NO_ANSWER
    extractor: str       # the extractor that matched, or "none"
    start: int           # where the final-answer marker begins (len(text) when there is none)


def _last(pattern: re.Pattern, text: str):
    m = None
    for m in pattern.finditer(text):
        pass
    return m


_ANSWER_IS = re.compile(r"[Tt]he (?:final |correct )?answer is\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)")
_HASH = re.compile(r"####\s*([^\n]+)")
_ANSWER_COLON = re.compile(r"(?im)^\s*(?:\**final answer\**|\**answer\**)\s*:\s*(.+?)\s*$")


def _answer_is(text: str):
    m = _last(_ANSWER_IS, text)
    return (m.group(1), m.start()) if m else None


def _hash(text: str):
    m = _last(_HASH, text)
    return (m.group(1), m.start()) if m else None


def _boxed(text: str):
    idx = text.rfind("\\boxed{")
    if idx < 0:
        return None
    depth, i = 1, idx + len("\\boxed{")
    start = i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    if depth:
        return None
    return text[start:i - 1], idx


def _answer_colon(text: str):
    m = _last(_ANSWER_COLON, text)
    return (m.group(1), m.start()) if m else None


def _last_number(text: str):
    m = _last(_NUMBER, text)
    return (m.group(0), len(text)) if m else None


_LETTER = re.compile(r"\(([A-J])\)|\b([A-J])\)")


def _last_letter(text: str):
    m = _last(_LETTER, text)
    return (m.group(1) or m.group(2), len(text)) if m else None


def _last_line(text: str):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1], len(text)) if lines else None


@dataclass(frozen=True)
class Extractor:
    """A span extractor (`filter.extractors` names it): `find(text)` gives (span, end) or
    None; `marker`: it reads an explicit final-answer marker, not a fallback."""

    name: str
    find: object
    marker: bool


for _name, _find, _marker in (("answer_is", _answer_is, True), ("hash", _hash, True),
                              ("boxed", _boxed, True), ("answer_colon", _answer_colon, True),
                              ("last_number", _last_number, False),
                              ("last_letter", _last_letter, False),
                              ("last_line", _last_line, False)):
    EXTRACTOR_REGISTRY.register(Extractor(_name, _find, _marker))


def is_marker(extractor: str) -> bool:
    """Whether the extractor recorded on a trace (`name` or `name:how`) read an explicit
    final-answer marker."""
    name = extractor.split(":")[0]
    return name in EXTRACTOR_REGISTRY and EXTRACTOR_REGISTRY.get(name).marker


def extract_answer(text: str, order: list[str]) -> Extraction:
    """Try the span extractors in `order`; the first that matches gives the answer text."""
    for name in order:
        found = EXTRACTOR_REGISTRY.get(name).find(text)
        if found is not None and found[0].strip():
            return Extraction(found[0].strip(), name, found[1])
    return Extraction(NO_ANSWER, "none", len(text))


# ---- numbers -------------------------------------------------------------------------------

_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?\d+(?:\.\d+)?)\s*\}\{\s*(-?\d+(?:\.\d+)?)\s*\}")
_MIXED = re.compile(r"(-?\d+)\s+(\d+)\s*/\s*(\d+)")
_SLASH = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)\s*/\s*(\d[\d,]*(?:\.\d+)?)")


def to_number(text: str) -> Fraction | None:
    """A number from an answer string: `$1,200.` -> 1200, `50%` -> 50, `3/4`, `\\frac{3}{4}`,
    `1 1/2` -> 3/2, `-2.5 kg` -> -5/2. The first number in the string counts."""
    if text is None:
        return None
    if text.isdigit():  # the common case, fast
        return Fraction(int(text))
    m = _FRAC.search(text) if "frac" in text else None
    if m:
        den = Fraction(m.group(2))
        return Fraction(m.group(1)) / den if den else None
    m = _MIXED.match(text.strip()) if "/" in text else None
    if m:
        whole, num, den = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if den and num < den:
            frac = Fraction(num, den)
            return whole - frac if text.strip().startswith("-") else whole + frac
    m = _NUMBER.search(text)
    if not m:
        return None
    s = _SLASH.match(text, m.start()) if "/" in text else None
    try:
        if s:
            den = Fraction(s.group(2).replace(",", ""))
            if den:
                return Fraction(s.group(1).replace(",", "")) / den
        raw = m.group(0).replace(",", "").replace("$", "").replace(" ", "")
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_match(a: Fraction | None, b: Fraction | None, tolerance: float = 1e-6) -> bool:
    if a is None or b is None:
        return False
    if a == b:
        return True
    scale = max(abs(a), abs(b), 1)
    return abs(a - b) <= Fraction(tolerance) * scale


def format_number(n: Fraction) -> str:
    """1200 -> `1200`, 5/2 -> `2.5`, 1/3 -> `1/3` (exact; no rounding)."""
    if n.denominator == 1:
        return str(n.numerator)
    d = n.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{n.numerator}/{n.denominator}"
    digits = 0
    while (n * 10 ** digits).denominator != 1:
        digits += 1
    return f"{float(n):.{digits}f}"


# ---- text, choices, labels -----------------------------------------------------------------

def normalize_text(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"^[\"'(\[*]+|[\"')\].!?,;:*]+$", "", text)
    return re.sub(r"\s+", " ", text)


_OPTION = re.compile(r"(?:^|\s|\n)\(?([A-J])[).:]\s+(.+?)(?=\s+\(?[A-J][).:]\s|\n|$)")


@functools.lru_cache(maxsize=1024)
def parse_options(question: str) -> dict[str, str]:
    """Multiple-choice options written in a question: `(A) text`, `A) text` or `A. text`."""
    return {m.group(1): normalize_text(m.group(2)) for m in _OPTION.finditer(question or "")}


_LETTER_ANSWER = re.compile(r"^\(?(?:option |choice )?\(?([A-J])\)?(?:$|[.):,\s])", re.I)


def to_choice(span: str, options: dict[str, str]) -> tuple[str, str] | None:
    """(letter, how): from a letter (`(B)`, `B.`, `option b`) or the text of one option."""
    m = _LETTER_ANSWER.match(span.strip())
    if m and (not options or m.group(1).upper() in options):
        return m.group(1).upper(), "letter"
    norm = normalize_text(span)
    if not norm:
        return None
    exact = [k for k, v in options.items() if v == norm]
    if len(exact) == 1:
        return exact[0], "option_text"
    inside = [k for k, v in options.items() if v and re.search(
        rf"(?<!\w){re.escape(v)}(?!\w)", norm)]
    if len(inside) == 1:
        return inside[0], "option_text"
    return None


def _stem(label: str) -> str:
    return label if len(label) <= 7 else label[:len(label) - 4]


def to_label(span: str, labels: list[str]) -> str | None:
    """The one label that `span` names (its word or a form of it: "entails" -> entailment);
    None when it names none or several."""
    words = re.findall(r"[a-z]+", span.lower())
    hits = {lab for lab in labels for w in words if w.startswith(_stem(lab.lower()))}
    return hits.pop() if len(hits) == 1 else None


# ---- the checker ---------------------------------------------------------------------------

class AnswerKind:
    """One way of reading and comparing answers (`task.answer_type`): a class registered under
    its name (`@ANSWER_KINDS.register`), built for a run with the filter's tolerance and the
    task's labels. A new kind is one file in this package (see `tests/test_extensions.py`).

    `order`: the extractors tried, in order, when `filter.extractors` is not set;
    `numeric`: its answers are numbers (the hinted-trace checks compare them with the
    rationale's results). The methods take what an extractor found and the question."""

    name: ClassVar[str] = ""
    order: ClassVar[tuple[str, ...]] = ()
    numeric: ClassVar[bool] = False

    def __init__(self, tolerance: float = 1e-6, labels: list[str] | None = None):
        self.tolerance = tolerance
        self.labels = list(labels or DEFAULT_LABELS)

    def read(self, span: str, question: str) -> tuple[str, str] | None:
        """(the answer, how it was read: '' or a word recorded after the extractor's name)
        from the span an extractor found; None when the span holds no answer of this kind
        (the next extractor is tried)."""
        return span.strip(), ""

    def gold(self, gold: str, question: str) -> str:
        """The gold answer in this kind's terms."""
        return str(gold)

    def match(self, pred: str, gold: str, question: str) -> bool:
        return normalize_text(pred) == normalize_text(str(gold))

    def canonical(self, pred: str) -> str:
        """The answer as the student is taught to write it."""
        return pred.strip()

    def key(self, pred: str) -> str:
        """A key under which equal answers agree (for majority votes)."""
        return normalize_text(pred)

    def decided_by(self) -> dict:
        """What besides its name decides how this kind reads answers (in the filter's and
        eval's fingerprints)."""
        return {}


# "####" and \boxed are only ever written as the final answer, so they go first
@ANSWER_KINDS.register
class NumericAnswers(AnswerKind):
    """A number, with commas, currency, units, percent signs, fractions and decimals,
    compared with a relative tolerance."""

    name, numeric = "numeric", True
    order = ("hash", "boxed", "answer_is", "answer_colon", "last_number")

    def match(self, pred: str, gold: str, question: str) -> bool:
        return numbers_match(to_number(pred), to_number(gold), self.tolerance)

    def canonical(self, pred: str) -> str:  # `1,200.0` -> `1200`
        n = to_number(pred)
        return format_number(n) if n is not None else pred.strip()

    def key(self, pred: str) -> str:
        n = to_number(pred)
        return format_number(n) if n is not None else normalize_text(pred)


@ANSWER_KINDS.register
class MathAnswers(AnswerKind):
    """LaTeX or symbolic answers, compared through `math-verify` (plain numbers first)."""

    name, numeric = "math", True
    order = ("boxed", "hash", "answer_is", "answer_colon", "last_number")

    def match(self, pred: str, gold: str, question: str) -> bool:
        a, b = to_number(pred), to_number(gold)
        if a is not None and b is not None and _plain_number(pred) and _plain_number(gold):
            return numbers_match(a, b, self.tolerance)
        return _math_verify(gold, pred)

    def key(self, pred: str) -> str:
        n = to_number(pred)
        return format_number(n) if n is not None and _plain_number(pred) else normalize_text(pred)


@ANSWER_KINDS.register
class ChoiceAnswers(AnswerKind):
    """A multiple-choice letter, written as the letter or as the option's text (mapped back
    to its letter through the options in the question)."""

    name = "choice"
    order = ("answer_is", "answer_colon", "hash", "boxed", "last_letter")

    def read(self, span: str, question: str) -> tuple[str, str] | None:
        return to_choice(span, parse_options(question))

    def gold(self, gold: str, question: str) -> str:
        got = to_choice(str(gold), parse_options(question))
        return got[0] if got else str(gold).strip().upper()

    def match(self, pred: str, gold: str, question: str) -> bool:
        return pred == self.gold(gold, question)


@ANSWER_KINDS.register
class LabelAnswers(AnswerKind):
    """One of the task's class labels (e-SNLI/ANLI by default), also written as a verb form
    ("entails", "contradicts")."""

    name = "label"
    order = ("answer_is", "answer_colon", "hash", "boxed", "last_line")

    def read(self, span: str, question: str) -> tuple[str, str] | None:
        label = to_label(span, self.labels)
        return (label, "") if label else None

    def gold(self, gold: str, question: str) -> str:
        return to_label(str(gold), self.labels) or normalize_text(str(gold))

    def match(self, pred: str, gold: str, question: str) -> bool:
        return pred == self.gold(gold, question)

    def decided_by(self) -> dict:
        return {"labels": self.labels}


@ANSWER_KINDS.register
class StringAnswers(AnswerKind):
    """The normalised text."""

    name = "string"
    order = ("answer_is", "answer_colon", "hash", "boxed", "last_line")


class AnswerChecker:
    """Extracts and compares the answers of one kind: the extractors find the span, the kind
    (`AnswerKind`) reads and compares it."""

    def __init__(self, kind: str = "numeric", extractors: list[str] | None = None,
                 tolerance: float = 1e-6, labels: list[str] | None = None):
        self.answers = ANSWER_KINDS.get(kind)(tolerance, labels)  # unknown: says which exist
        self.kind = kind
        self.order = list(extractors or self.answers.order)
        self.tolerance = tolerance
        self.labels = self.answers.labels

    def extract(self, text: str, question: str = "") -> Extraction:
        """The answer as this kind reads it; the extractor is `span` or `span:how`."""
        for name in self.order:
            found = EXTRACTOR_REGISTRY.get(name).find(text)
            if found is None or not found[0].strip():
                continue
            got = self.answers.read(found[0], question)
            if got:
                return Extraction(got[0], f"{name}:{got[1]}" if got[1] else name, found[1])
        return Extraction(NO_ANSWER, "none", len(text))

    def gold(self, gold: str, question: str = "") -> str | None:
        """The gold answer in this kind's terms (a letter for choice, a label for label)."""
        return None if gold is None else self.answers.gold(gold, question)

    def match(self, pred: str, gold: str, question: str = "") -> bool:
        if pred == NO_ANSWER or gold is None:
            return False
        return self.answers.match(pred, gold, question)

    def canonical(self, pred: str) -> str:
        """The answer as the student is taught to write it: `1,200.0` -> `1200`."""
        return self.answers.canonical(pred)

    def key(self, pred: str) -> str:
        """A key under which equal answers agree (for majority votes)."""
        return pred if pred == NO_ANSWER else self.answers.key(pred)

    def decided_by(self) -> dict:
        """What besides the kind's name and the extractors decides how answers are read."""
        return self.answers.decided_by()


def answer_checker(cfg: Config, extractors: list[str] | None = None) -> AnswerChecker:
    """The run's answer checker: the task's answer kind, the filter's tolerance, the task's
    labels; `extractors` in that order (the filter's setting), or the kind's default order."""
    return AnswerChecker(answer_kind(cfg.task), extractors, cfg.filter.tolerance,
                         cfg.task.labels)


_PLAIN = re.compile(r"^\s*-?\$?\s*[\d,]*\.?\d+\s*%?\s*$")


def _plain_number(text: str) -> bool:
    return bool(_PLAIN.match(text))


def _math_verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        s = s.strip()
        return s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"

    try:
        return bool(verify(parse(wrap(gold)), parse(wrap(pred))))
    except Exception:  # a parser failure on odd text is a non-match, not a crash
        return False
