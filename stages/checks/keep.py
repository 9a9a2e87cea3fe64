"""Which traces the filter keeps: the registered checks of each trace, the majority answer of
unlabeled questions, then duplicates and the per-question cap among what the checks kept.

`decide` is the whole decision for a table of whole questions' traces; the filter stage
(`stages.filter.stage`) writes what it decides, generate's rounds (`stages.generate.rounds`) count with it
which questions are still short of kept traces, so the two never disagree.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from stages.checks.settings import FilterConfig
from pipeline.costs import ledger_lines
from stages.checks.answers import NO_ANSWER, AnswerChecker, is_marker
from stages.checks.traces import Trace, count_steps, ordered_checks

# Drops decided per question, among the traces every check kept.
QUESTION_REASONS = {
    "duplicate": "the same (or nearly the same) rationale as a kept trace of the question",
    "over_cap": "more traces of the question than filter.max_per_question",
}


def reasons() -> list[str]:
    """Every reason a trace can be dropped for, in the order the checks run."""
    return [c.name for c in ordered_checks()] + list(QUESTION_REASONS)


def explained() -> dict[str, str]:
    """Each reason in words."""
    return {**{c.name: c.explained for c in ordered_checks()}, **QUESTION_REASONS}


def _norm_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[.,][0-9]+)*", text.lower())


def similar(a: list[str], b: list[str], threshold: float) -> bool:
    """Word-sequence similarity (difflib's ratio, 2 * matched words / all words) >= threshold;
    the cheap upper bounds are tried first."""
    m = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return (m.real_quick_ratio() >= threshold and m.quick_ratio() >= threshold
            and m.ratio() >= threshold)


def check_trace(row: dict, cfg: FilterConfig, checker: AnswerChecker, *, gold: str | None,
                gold_source: str, checks: list | None = None) -> tuple[str | None, dict]:
    """(reason or None, the added columns) for one trace, checked against `gold`: the row's
    gold answer (`gold_source="gold"`) or its samples' majority answer ("majority"), None
    when there is neither. The registered checks (`checks`: `ordered_checks()`, looked up
    once per shard by the caller) run in their order; the first that fails gives the
    reason."""
    text = row["completion"] or ""
    found = row.get("_found") or checker.extract(text, row.get("question") or "")
    marker = is_marker(found.extractor)
    rationale = text[:found.start].strip() if marker else text.strip()
    words = text.split()
    added = {"pred_answer": found.answer, "extractor": found.extractor, "rationale": rationale,
             "n_steps": count_steps(rationale), "n_tokens": len(row["token_ids"] or []),
             "n_words": len(words), "n_equations": 0, "repeat_share": 0.0,
             "gold_source": gold_source if gold is not None else None,
             "agreement": row.get("_agreement"), "detail": None}
    trace = Trace(row, found, marker, rationale, gold, checker, added)
    for check in checks if checks is not None else ordered_checks():
        detail = check(trace, cfg)
        if detail is not None:
            if detail:
                added["detail"] = detail
            return check.name, added
    return None, added


def _majority(rows: list[dict], checker: AnswerChecker, cfg: FilterConfig):
    """(pseudo-gold or None, agreement) from the answers of one question's samples."""
    keys = [checker.key(r["_found"].answer) for r in rows
            if r["_found"].answer != NO_ANSWER and not r.get("error")]
    if not keys:
        return None, 0.0
    key, votes = Counter(keys).most_common(1)[0]
    agreement = votes / len(rows)
    if votes < cfg.min_votes or agreement < cfg.min_agreement:
        return None, agreement
    answer = next(r["_found"].answer for r in rows if checker.key(r["_found"].answer) == key)
    return answer, agreement


@dataclass
class FilterSettings:
    """What `filter_shard` needs besides the shard: the settings, the answer checker and the
    kept traces a question is wanted to have (for the coverage counts)."""

    cfg: FilterConfig
    checker: AnswerChecker
    wanted: int = 1


def coverage_counters(small: list[dict], results: list, by_question: dict, lengths: list[int],
                      wanted: int) -> dict[str, int]:
    """Question coverage (the headline figure): questions, those with at least one kept trace
    and with at least `wanted`, and the teacher tokens generated (all traces, kept or not;
    hinted ones apart as well), and the traces a distilled student sampled (`distill
    iterate`), with their tokens (not the teacher's)."""
    kept = kept_per_question(small, results, by_question)
    hinted = [i for i, row in enumerate(small) if row.get("hinted")]
    by_student = [i for i, row in enumerate(small) if row.get("sampler") == "student"]
    return {"questions": len(by_question),
            "covered": sum(1 for n in kept.values() if n >= 1),
            "covered_wanted": sum(1 for n in kept.values() if n >= wanted),
            "labelled_questions": sum(1 for ids in by_question.values()
                                      if small[ids[0]]["gold"] is not None),
            "teacher_tokens": sum(lengths) - sum(lengths[i] for i in by_student),
            "hinted_in": len(hinted),
            "hinted_kept": sum(1 for i in hinted if results[i][0] is None),
            "student_in": len(by_student),
            "student_kept": sum(1 for i in by_student if results[i][0] is None),
            "student_tokens": sum(lengths[i] for i in by_student)}


# what deciding a trace reads (the rest of a shard passes through untouched)
DECIDED_ON = ["id", "sample", "question", "completion", "finish_reason", "gold", "error",
              "token_ids"]


def decide(table: pa.Table, settings: FilterSettings, checks: list | None = None):
    """(small rows, their (reason or None, added columns), row indices by question) for a
    table of traces of whole questions: only the `DECIDED_ON` columns (and `round`, `hinted`,
    `sampler` when there) go through Python. Used by the filter and by generate's rounds, which count
    the traces the filter will keep."""
    cfg, checker = settings.cfg, settings.checker
    checks = ordered_checks() if checks is None else checks
    names = [c for c in DECIDED_ON[:-1] + ["round", "hinted", "sampler"]
             if c in table.schema.names]
    small = table.select(names).to_pylist()
    lengths = pc.list_value_length(table.column("token_ids")).to_pylist()
    by_question: dict[str, list[int]] = {}
    for i, row in enumerate(small):
        row["token_ids"] = range(lengths[i] or 0)
        row["_found"] = checker.extract(row["completion"] or "", row["question"] or "")
        by_question.setdefault(row["id"], []).append(i)
    results: list[tuple[str | None, dict]] = [None] * len(small)  # type: ignore[list-item]
    samples = [row["sample"] for row in small]
    for ids in by_question.values():
        gold = small[ids[0]]["gold"]
        source = "gold"
        if gold is None:
            gold, agreement = _majority([small[i] for i in ids], checker, cfg)
            source = "majority"
            for i in ids:
                small[i]["_agreement"] = round(agreement, 4)
        for i in ids:
            results[i] = check_trace(small[i], cfg, checker, gold=gold, gold_source=source,
                                     checks=checks)
            results[i][1]["round"] = small[i].get("round", 1)
            results[i][1]["hinted"] = bool(small[i].get("hinted", False))
            results[i][1]["sampler"] = small[i].get("sampler") or "teacher"
        _dedup_and_cap([i for i in ids if results[i][0] is None], results, cfg, samples)
    return small, results, by_question


def kept_per_question(small: list[dict], results: list, by_question: dict) -> dict[str, int]:
    """Question id -> its kept traces (from `decide`)."""
    return {q: sum(1 for i in ids if results[i][0] is None) for q, ids in by_question.items()}


def _dedup_and_cap(kept: list[int], results: list, cfg: FilterConfig,
                   samples: list[int]) -> None:
    """Among one question's kept traces (in sample order): duplicates of an earlier kept one
    dropped, then at most `max_per_question` kept."""
    survivors = kept
    if cfg.dedup != "off" and len(kept) > 1:
        chosen: list[tuple[str, list[str]]] = []
        survivors = []
        for i in kept:
            added = results[i][1]
            words = _norm_words(added["rationale"])
            key = " ".join(words)
            twin = next((k for k, (other_key, other) in enumerate(chosen)
                         if key == other_key or cfg.dedup == "near"
                         and similar(words, other, cfg.near_duplicate)), None)
            if twin is not None:
                added["detail"] = f"duplicate of sample {samples[survivors[twin]]} of this " \
                    "question"
                results[i] = ("duplicate", added)
                continue
            chosen.append((key, words))
            survivors.append(i)
    if cfg.max_per_question:
        for n, i in enumerate(survivors):
            if n >= cfg.max_per_question:
                results[i] = ("over_cap", results[i][1])


def coverage_lines(counters: dict, wanted: int | None = None,
                   book: dict | None = None) -> list[str]:
    """Question coverage in words, the headline of every report of the filter: training
    questions with a kept trace (and with `wanted`), and the teacher tokens paid per kept trace
    and per covered question; with the run's ledger (`book`, the filter's `ledger` fact), its
    prompt and completion tokens and the cost per kept trace and per covered question. Empty
    for a filter run before it was counted."""
    if "questions" not in counters:
        return []
    q, covered, kept = counters["questions"], counters["covered"], counters.get("kept", 0)
    tokens = counters.get("teacher_tokens", 0)
    lines = [f"question coverage: {covered} of {q} training questions ({covered / max(1, q):.1%})"
             f" have a kept trace"]
    if wanted and wanted > 1:
        lines[0] += (f", {counters.get('covered_wanted', 0)} "
                     f"({counters.get('covered_wanted', 0) / max(1, q):.1%}) have {wanted}")
    lines.append(f"teacher tokens: {tokens:,} in all, {tokens / max(1, kept):,.0f} per kept "
                 f"trace, {tokens / max(1, covered):,.0f} per covered question")
    lines += ledger_lines(book, kept, covered)
    if counters.get("hinted_in"):
        lines.append(f"hinted traces (the answer in the prompt): {counters['hinted_kept']} of "
                     f"{counters['hinted_in']} kept")
    if counters.get("student_in"):
        lines.append(f"student-sampled traces (distill iterate): {counters['student_kept']} of "
                     f"{counters['student_in']} kept, {counters.get('student_tokens', 0):,} "
                     "student tokens")
    return lines
