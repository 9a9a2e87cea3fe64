"""The eval section (`eval.*` in a config): the systems scored, on which rows, with which
budgets, and majority voting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import Section, opt
from pipeline.registry import did_you_mean

VALID_SYSTEMS = ["teacher", "base", "predict", "explain"]


@dataclass
class EvalConfig(Section):
    NAME: ClassVar[str] = "eval"

    systems: list[str] = opt(["teacher", "base", "predict", "explain"], "What to evaluate: the "
                             "teacher (few-shot CoT), the base student (predict:), the distilled "
                             "student in predict: and explain: modes.")
    variants: list[str] | None = opt(None, "Trained students to score (train.name values; '' "
                                     "is the run's train/ folder); null = every finished one.")
    n: int | None = opt(200, "Held-out rows to evaluate; null = all.", ge=1)
    split: str = opt("test", "The rows scored: `test` (the held-out split, into eval/) or "
                     "`validation` (task.validation_share of the training questions, into "
                     "eval-validation/: what to choose settings on).",
                     choices=["test", "validation"])
    batch_size: int = opt(64, "Prompts per generation batch.", ge=1)
    max_new_tokens: int = opt(160, "Generation budget in the reasoning modes (teacher, "
                              "explain:).", ge=1)
    predict_max_new_tokens: int = opt(16, "Generation budget in predict: mode.", ge=1)
    dtype: str = opt("bfloat16", "Weights' dtype at evaluation.",
                     choices=["bfloat16", "float32", "float16"])
    vote_samples: int = opt(0, "Self-consistency (Wang et al. 2023): also score the systems of "
                            "eval.vote_systems by a majority vote over this many sampled "
                            "answers (maj@k, next to greedy; tokens counted for all k); 0 = off.",
                            ge=0, le=64)
    vote_systems: list[str] = opt(["explain", "teacher"], "The reasoning systems scored by "
                                  "majority vote when eval.vote_samples > 0 (explain, teacher).")
    vote_temperature: float = opt(0.7, "Sampling temperature of the voted answers.", gt=0.0,
                                  le=5.0)

    def _check(self, errors: list[str]) -> None:
        for name in self.vote_systems:
            if name not in ("explain", "teacher"):
                errors.append(f"eval.vote_systems: '{name}' cannot vote (a vote is over "
                              "reasoning chains); use explain and/or teacher")
        for name in self.systems:
            if name not in VALID_SYSTEMS:
                errors.append(f"eval.systems: unknown system '{name}'; "
                              f"{did_you_mean(name, VALID_SYSTEMS)}")
