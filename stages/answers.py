"""Final-answer extraction and comparison, shared by the filter and the evaluation.

Extractors are named and tried in a configured order, strict ones first; the first match wins
and its name is recorded. No match gives the sentinel `NO_ANSWER`, never an empty label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

NO_ANSWER = "[no answer]"

_NUM = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_NUMBER = re.compile(_NUM)


@dataclass(frozen=True)
class Extraction:
    answer: str          # the raw extracted text, or NO_ANSWER
    extractor: str       # the extractor that matched, or "none"
    start: int           # where the final-answer marker begins (len(text) when there is none)


def _answer_is(text: str):
    m = None
    for m in re.finditer(r"[Tt]he (?:final )?answer is\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", text):
        pass
    return (m.group(1), m.start()) if m else None


def _hash(text: str):
    m = None
    for m in re.finditer(r"####\s*([^\n]+)", text):
        pass
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
    m = None
    for m in re.finditer(r"(?im)^\s*(?:final )?answer\s*:\s*(.+?)\s*$", text):
        pass
    return (m.group(1), m.start()) if m else None


def _last_number(text: str):
    m = None
    for m in _NUMBER.finditer(text):
        pass
    return (m.group(0), len(text)) if m else None


EXTRACTORS = {"answer_is": _answer_is, "hash": _hash, "boxed": _boxed,
              "answer_colon": _answer_colon, "last_number": _last_number}
MARKER_EXTRACTORS = {"answer_is", "hash", "boxed", "answer_colon"}


def extract_answer(text: str, order: list[str]) -> Extraction:
    """Try the extractors in `order`; the first that matches gives the answer."""
    for name in order:
        found = EXTRACTORS[name](text)
        if found is not None and found[0].strip():
            return Extraction(found[0].strip(), name, found[1])
    return Extraction(NO_ANSWER, "none", len(text))


def to_number(text: str) -> Decimal | None:
    """A number from an answer string: commas, currency, units and a trailing period ignored."""
    m = _NUMBER.search(text)
    if not m:
        return None
    raw = m.group(0).replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Decimal(raw)
    except InvalidOperation:
        return None


def normalize_text(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"^[\"'(\[]+|[\"')\].!?,;:]+$", "", text)
    return re.sub(r"\s+", " ", text)


def answers_match(pred: str, gold: str, numeric: bool = True, tolerance: float = 1e-6) -> bool:
    """Compare an extracted answer with the gold one: `3.0` = `3`, `$1,200.` = `1200`."""
    if pred == NO_ANSWER or gold is None:
        return False
    if numeric:
        a, b = to_number(pred), to_number(gold)
        if a is None or b is None:
            return False
        if a == b:
            return True
        scale = max(abs(a), abs(b), Decimal(1))
        return abs(a - b) <= Decimal(str(tolerance)) * scale
    return normalize_text(pred) == normalize_text(gold)


def canonical_answer(text: str, numeric: bool = True) -> str:
    """The answer as the student is taught to write it: `1,200.0` -> `1200`."""
    if numeric:
        n = to_number(text)
        if n is not None:
            n = n.normalize()
            return format(n, "f") if n != n.to_integral() else str(int(n))
    return text.strip()
