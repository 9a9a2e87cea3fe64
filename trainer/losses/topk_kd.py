"""Token-level KD from the teacher's stored top-k log-probabilities, on the explain targets.

At every explain-target position the shard holds the teacher's top-k token ids and their
log-probabilities (log-softmax of the raw logits). Two ways to compare the student with them:

- `tail="bucket"` (default): k + 1 categories, the top-k tokens and one bucket for all other
  tokens. The teacher's bucket holds 1 - sum(top-k probabilities); the student's holds
  1 - sum(its probabilities of the same k tokens). Exact at T = 1: it is the KL between the
  two full distributions coarsened to this partition.
- `tail="renormalize"`: only the top-k tokens, both distributions renormalised over them.

Temperature T softens both (k+1)- or k-categoricals the same way, q_T ∝ q^(1/T); the loss is
scaled by T^2 as in Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", so
its gradients keep their size across temperatures. `beta` mixes forward and reverse KL:
D = (1 - beta) KL(teacher || student) + beta KL(student || teacher); beta = 0 is the forward
KL of classic KD, beta = 1 the reverse KL of on-policy distillation (Agarwal et al., 2024,
"On-Policy Distillation of Language Models", use a generalised JSD between these ends).

Entries whose id is -1 (an API token string without a unique id) or whose log-probability is
-inf are folded into the bucket (or dropped when renormalising). Memory: beyond the student's
own [N, V] logits only [chunk, V] temporaries exist at a time (the log-sum-exp), and [N, k]
tensors.
"""

from __future__ import annotations

import math

import torch

from trainer.settings import TrainConfig
from trainer.losses.base import (LossContext, explain_schedule, register, scheduled,
                                  teacher_rows)

TAILS = ("bucket", "renormalize")
_TAIL_FLOOR = math.log(1e-6)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurately (Mächler, 2012)."""
    x = x.clamp(max=-1e-7)
    near = x > -0.6931
    # each branch gets inputs where it is finite, so the unused one passes no NaN gradient
    x_near = torch.where(near, x, torch.full_like(x, -0.6931))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _categoricals(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                  topk_logprobs: torch.Tensor, tail: str, chunk: int,
                  lse: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over the compared categories, and their mask."""
    valid = (topk_ids >= 0) & torch.isfinite(topk_logprobs)
    ids = topk_ids.clamp(min=0).long()
    picked = _wide(student_logits.gather(1, ids))                              # [N, k]
    if lse is None:
        lse = torch.cat([torch.logsumexp(_wide(student_logits[i:i + chunk]), dim=-1)
                         for i in range(0, student_logits.shape[0], chunk)]) \
            if student_logits.shape[0] else picked.new_zeros(0)
    neg = torch.finfo(torch.float32).min
    s = torch.where(valid, picked - lse[:, None], neg)                        # log s_i
    t = torch.where(valid, topk_logprobs.to(picked.dtype), neg)               # log q_i
    if tail == "renormalize":
        return torch.log_softmax(s, -1), torch.log_softmax(t, -1), valid
    s_tail = _log1mexp(torch.logsumexp(s, -1, keepdim=True))
    t_tail = _log1mexp(torch.logsumexp(t, -1, keepdim=True))
    # A bucket below 1e-6 is float32 rounding of a top k that holds (nearly) everything; as a
    # category of its own a temperature would blow it up (1e-7 ** (1/2) = 3e-4), so it is left out
    mask = torch.cat([valid, t_tail > _TAIL_FLOOR], 1)
    return torch.cat([s, s_tail], 1), torch.cat([t, t_tail], 1), mask


def topk_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                 topk_logprobs: torch.Tensor, temperature: float = 1.0, beta: float = 0.0,
                 tail: str = "bucket", chunk: int = 1024,
                 lse: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of T^2 * D(teacher_T || student_T); see the module docstring.

    student_logits [N, V] (any float dtype), topk_ids [N, k] (int, -1 = unknown),
    topk_logprobs [N, k] (the teacher's log-probabilities at T = 1). N may be 0. `lse` [N]:
    the student's log-sum-exp over the vocabulary when the caller has it already (the
    cross-entropy needs it too), saving a pass over [N, V].
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    s, t, mask = _categoricals(student_logits, topk_ids, topk_logprobs, tail, chunk, lse)
    if temperature != 1.0:  # soften both categoricals the same way: q_T ∝ q^(1/T)
        s = torch.log_softmax(torch.where(mask, s / temperature, s.new_tensor(-1e30)), -1)
        t = torch.log_softmax(torch.where(mask, t / temperature, t.new_tensor(-1e30)), -1)
    ps, pt = s.exp() * mask, t.exp() * mask
    forward = (pt * (t - s)).sum(-1)
    loss = forward if beta == 0.0 else (1 - beta) * forward + beta * (ps * (s - t)).sum(-1)
    return loss.mean() * temperature ** 2


@register
class ExplainTopKKD:
    """KD on the explain targets (the teacher's own tokens) from their stored top-k rows,
    weighted by `(1 - alpha) * kd_lam` and warmed up with the explain cross-entropy."""

    name, part, needs, switch = "kd", "explain", frozenset({"topk"}), "kd_lam"

    def __init__(self, weight: float, schedule=None, temperature: float = 1.0,
                 beta: float = 0.0, tail: str = "bucket"):
        self.weight, self.schedule = weight, schedule
        self.temperature, self.beta, self.tail = temperature, beta, tail

    def weight_at(self, step: int) -> float:
        return scheduled(self.weight, self.schedule, step)

    @classmethod
    def from_settings(cls, t: TrainConfig) -> "ExplainTopKKD | None":
        weight = (1 - t.alpha) * t.kd_lam
        if weight <= 0:
            return None
        return cls(weight, explain_schedule(t), t.kd_temperature, t.kd_beta, t.kd_tail)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        logits, lse, ids, lps = teacher_rows(ctx, self.part)
        return topk_kd_loss(logits, ids, lps, self.temperature, self.beta, self.tail, lse=lse)
