"""The iterate section (`iterate.*` in a config): the loop's rounds, the student's sampling
and the teacher's scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import NEVER, Section, opt


@dataclass
class IterateConfig(Section):
    """`distill iterate`: the distilled student samples the training questions again (ReST-EM,
    Singh et al. 2023; STaR, Zelikman et al. 2022), the filter pools its kept traces with the
    teacher's, and the next student trains from the base model on the pool."""

    NAME: ClassVar[str] = "iterate"

    rounds: int = opt(3, "Rounds in all: round 1 is the teacher's pipeline, each later round "
                      "samples with the student of the round before.", ge=1, le=20)
    samples: list[int] = opt([4], "Samples the student draws per question it samples, in "
                             "rounds 2, 3, ...; the last one repeats (later rounds face the "
                             "harder questions: e.g. [4, 4, 8]).", ge=1, le=64)
    temperatures: list[float] = opt([0.7], "The student's sampling temperature in rounds 2, 3, "
                                    "...; the last one repeats.")
    covered_share: float = opt(0.0, "Share of the questions that already have enough kept "
                               "traces that the student samples too (for diverse paths; chosen "
                               "by a hash of the question and round).", ge=0.0, le=1.0)
    max_new_tokens: int | None = opt(None, "Tokens the student generates at most per trace; "
                                     "null = eval.max_new_tokens.", ge=1)
    teacher_scores: bool = opt(True, "The teacher scores the student's traces with a forward "
                               "pass: their stored top-k are the teacher's at every position, so "
                               "top-k KD learns from them (off by itself for API teachers).")
    until_flat: bool = opt(True, "Stop before rounds when a round raised neither question "
                           "coverage nor the explain: held-out accuracy.")
    batch_size: int = opt(32, "Prompts per batch of the student's sampling and the teacher's "
                          "scoring.", ge=1, fingerprint=NEVER)

    def _check(self, errors: list[str]) -> None:
        if not self.samples:
            errors.append("iterate.samples: give one or more sample counts, e.g. [4]")
        if not self.temperatures or any(not 0 < t <= 5 for t in self.temperatures):
            errors.append("iterate.temperatures: give one or more temperatures in (0, 5], "
                          "e.g. [0.7]")
