"""The filter section (`filter.*` in a config): what the checks of a trace (`traces.py`) and
the decision of which traces are kept (`keep.py`) read, and how the filter stage runs. A new
check declares its own setting here, `UNLESS_DEFAULT`, so that a run made before it keeps its
fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import NEVER, Section, opt
from pipeline.registry import EXECUTORS, EXTRACTORS, did_you_mean


@dataclass
class FilterConfig(Section):
    NAME: ClassVar[str] = "filter"

    extractors: list[str] | None = opt(None, "Where the final answer is read, tried in order (the "
                                       "first match wins): answer_is, hash, boxed, "
                                       "answer_colon, last_number, last_letter, last_line; null "
                                       "= the answer type's default order.")
    require_answer_marker: bool = opt(True, "Drop traces with no explicit final-answer marker "
                                      "('The answer is', '####', \\boxed, 'Answer:'); a "
                                      "distilled student's traces (distill iterate) are exempt: "
                                      "its explain: mode writes the rationale alone.")
    tolerance: float = opt(1e-6, "Relative tolerance when comparing numeric answers.", ge=0.0)
    check_arithmetic: bool = opt(True, "Drop traces whose written arithmetic is wrong "
                                 "(`a op b = c` in the text, GSM8K's <<a*b=c>>), even with a "
                                 "right final answer.")
    min_steps: int = opt(1, "Reasoning steps required (numbered lines, 'Step N', sentences or "
                         "lines that carry a calculation).", ge=0)
    min_tokens: int = opt(4, "Fewest generated tokens in a kept trace.", ge=0)
    max_tokens: int | None = opt(None, "Most generated tokens in a kept trace; null = no bound "
                                 "beyond generate.max_new_tokens (a trace that hits it is "
                                 "truncated, and dropped as such).", ge=1)
    min_words: int = opt(0, "Fewest words in a kept trace.", ge=0)
    max_words: int = opt(1000, "Most words in a kept trace.", ge=1)
    drop_truncated: bool = opt(True, "Drop traces cut off by the length limit.")
    repeat_ngram: int = opt(4, "n of the word n-grams that measure repetition.", ge=1, le=16)
    max_repeat_share: float = opt(0.5, "Drop traces whose share of repeated word n-grams is "
                                  "above this (a looping trace); 1 = never.", ge=0.0, le=1.0)
    dedup: str = opt("near", "Duplicate rationales for the same question: `near` (identical "
                     "after normalising, or word-sequence similarity >= near_duplicate), "
                     "`exact` (identical after normalising), `off`.",
                     choices=["near", "exact", "off"])
    near_duplicate: float = opt(0.9, "Word-sequence similarity (difflib ratio: 2 x matching "
                                "words / all words) from which two rationales of a question "
                                "count as duplicates.", gt=0.0, le=1.0)
    max_per_question: int = opt(0, "Most traces kept per question (the first samples); 0 = no "
                                "cap.", ge=0)
    min_agreement: float = opt(0.5, "Rows without a gold answer: the majority answer of their "
                               "samples is the pseudo-gold when at least this share of the "
                               "samples give it.", gt=0.0, le=1.0)
    min_votes: int = opt(2, "Rows without a gold answer: samples that must give the majority "
                         "answer.", ge=1)
    plot: bool = opt(True, "Also draw the funnel as funnel.png.", fingerprint=NEVER)
    executor: str = opt("local", "How the filter shards are run: `local` (one after the other "
                        "in this process) or `ray` (`filter.workers` Ray actors, settings in "
                        "the `ray` section). Job arrays need no setting: see `--worker-index`.",
                        choices=EXECUTORS, fingerprint=NEVER)
    workers: int = opt(1, "Ray workers (actors) that take filter shards from one queue.",
                       ge=1, le=4096, fingerprint=NEVER)

    def _check(self, errors: list[str]) -> None:
        for name in self.extractors or []:
            if name not in EXTRACTORS.names():
                errors.append(f"filter.extractors: unknown extractor '{name}'; "
                              f"{did_you_mean(name, sorted(EXTRACTORS.names()))}")
        if self.extractors is not None and not self.extractors:
            errors.append("filter.extractors: give at least one extractor, or null for the "
                          "answer type's default order")
        if self.min_words > self.max_words:
            errors.append(f"filter.min_words ({self.min_words}) is above filter.max_words "
                          f"({self.max_words})")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            errors.append(f"filter.min_tokens ({self.min_tokens}) is above filter.max_tokens "
                          f"({self.max_tokens})")
