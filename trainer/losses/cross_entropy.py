"""Token cross-entropy on the targets of one part: the two tasks of Distilling Step-by-Step
(Hsieh et al., ACL 2023), `alpha * L_predict + (1 - alpha) * L_explain`. Answer KD takes
`answer_kd_lam` of the predict weight, rationale KD `kd_lam` of the explain weight."""

from __future__ import annotations

import torch

from trainer.settings import TrainConfig
from trainer.losses.base import (LossContext, explain_schedule, predict_schedule, register,
                                  scheduled)


def cross_entropy(ctx: LossContext, part: str) -> torch.Tensor:
    """Mean cross-entropy of the part's targets, from the shared log-sum-exp."""
    out = ctx.outputs(part)
    return (out.lse - out.logits.gather(1, out.targets[:, None]).squeeze(1)).mean()


@register
class PredictCE:
    """`predict: <question>` -> the answer, weighted by `alpha` and warmed up over
    `predict_warmup_steps`."""

    name, part, needs, switch = "predict", "predict", frozenset(), "alpha"

    def __init__(self, weight: float, schedule=None):
        self.weight, self.schedule = weight, schedule

    def weight_at(self, step: int) -> float:
        return scheduled(self.weight, self.schedule, step)

    @classmethod
    def from_settings(cls, t: TrainConfig) -> "PredictCE | None":
        weight = t.alpha * (1 - t.answer_kd_lam)  # answer KD takes the rest
        return cls(weight, predict_schedule(t)) if weight > 0 else None

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        return cross_entropy(ctx, self.part)


@register
class ExplainCE:
    """`explain: <question>` -> the rationale, weighted by `(1 - alpha) * (1 - kd_lam)` (KD
    takes the rest of the explain weight) and warmed up over `explain_warmup_steps`; the
    rationale loss unless `rationale_loss=cosine` replaces it."""

    name, part, needs, switch = "explain", "explain", frozenset(), "alpha"

    def __init__(self, weight: float, schedule=None):
        self.weight, self.schedule = weight, schedule

    def weight_at(self, step: int) -> float:
        return scheduled(self.weight, self.schedule, step)

    @classmethod
    def from_settings(cls, t: TrainConfig) -> "ExplainCE | None":
        weight = (1 - t.alpha) * (1 - t.kd_lam)
        if t.rationale_loss != "ce" or weight <= 0:
            return None
        return cls(weight, explain_schedule(t))

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        return cross_entropy(ctx, self.part)
