"""Soft-label KD on the answer: "traditional" distillation (Hinton et al., 2015) of the
`predict:` task from the teacher's stored top-k at the tokens that spell its final answer.

With `train.answer_kd_lam > 0` the predict target is the teacher's own answer tokens (see
`trainer.examples.answer_span`), each carrying the teacher's top-k row from the trace; this
term is T^2 * KL(teacher_T || student_T) over the top-k plus one bucket for the rest (the same
divergence as the rationale KD, `topk_kd.topk_kd_loss`), weighted by `alpha * answer_kd_lam`;
the predict cross-entropy keeps `alpha * (1 - answer_kd_lam)`.
"""

from __future__ import annotations

import torch

from trainer.settings import TrainConfig
from trainer.losses.base import (LossContext, predict_schedule, register, scheduled,
                                  teacher_rows)
from trainer.losses.topk_kd import topk_kd_loss


@register
class AnswerKD:
    name, part, needs, switch = "answer_kd", "predict", frozenset({"topk"}), "answer_kd_lam"

    def __init__(self, weight: float, temperature: float, schedule=None):
        self.weight, self.temperature, self.schedule = weight, temperature, schedule

    def weight_at(self, step: int) -> float:
        return scheduled(self.weight, self.schedule, step)

    @classmethod
    def from_settings(cls, t: TrainConfig) -> "AnswerKD | None":
        weight = t.alpha * t.answer_kd_lam
        return (cls(weight, t.answer_kd_temperature, predict_schedule(t)) if weight > 0
                else None)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        logits, lse, ids, lps = teacher_rows(ctx, self.part)
        return topk_kd_loss(logits, ids, lps, self.temperature, lse=lse)
