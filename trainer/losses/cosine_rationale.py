"""A margin cosine loss on the rationale, in place of its token cross-entropy.

Step-by-step distillation write-ups that use a cosine rationale loss compare the student's and
the teacher's *representations* of the rationale. The teacher's hidden states are not stored
(only its top-k log-probabilities are), and a small student's hidden size differs from the
teacher's anyway, so the representation both share here is the next-token distribution at
each rationale token: the teacher's top-k tokens plus one bucket for every other token (the
categories of `topk_kd`, where the student's bucket is 1 - its probability of the same k
tokens). Per position the loss is `max(0, 1 - cos(p_student, p_teacher) - margin)`: positions
where the two distributions already point the same way within the margin add nothing, so the
loss spends the update on the positions where the student disagrees. Unlike KL, the cosine
is bounded and scale-free, so a few positions where the teacher was unsure (flat rows) cannot
dominate the loss. Weight `(1 - alpha) * (1 - kd_lam)`, warmed up like the explain loss.
"""

from __future__ import annotations

import torch

from trainer.settings import TrainConfig
from trainer.losses.base import (LossContext, explain_schedule, register, scheduled,
                                  teacher_rows)
from trainer.losses.topk_kd import _categoricals


def margin_cosine_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                       topk_logprobs: torch.Tensor, margin: float = 0.0,
                       lse: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of max(0, 1 - cos(student, teacher) - margin) between the two
    distributions over the teacher's top-k and the bucket of the rest. N may be 0."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    s, t, mask = _categoricals(student_logits, topk_ids, topk_logprobs, "bucket", 1024, lse)
    ps, pt = s.exp() * mask, t.exp() * mask
    cos = torch.nn.functional.cosine_similarity(ps, pt, dim=-1, eps=1e-12)
    return (1 - cos - margin).clamp(min=0).mean()


@register
class ExplainCosine:
    name, part, needs, switch = ("explain_cosine", "explain", frozenset({"topk"}),
                                 "rationale_loss")

    def __init__(self, weight: float, schedule=None, margin: float = 0.0):
        self.weight, self.schedule, self.margin = weight, schedule, margin

    def weight_at(self, step: int) -> float:
        return scheduled(self.weight, self.schedule, step)

    @classmethod
    def from_settings(cls, t: TrainConfig) -> "ExplainCosine | None":
        weight = (1 - t.alpha) * (1 - t.kd_lam)
        if t.rationale_loss != "cosine" or weight <= 0:
            return None
        return cls(weight, explain_schedule(t), t.cosine_margin)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        logits, lse, ids, lps = teacher_rows(ctx, self.part)
        return margin_cosine_loss(logits, ids, lps, self.margin, lse=lse)
