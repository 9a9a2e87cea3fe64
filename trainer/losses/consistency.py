"""Consistency regularisation: the student's answer should not move when its input is
slightly disturbed (as in unsupervised data augmentation, Xie et al., 2020, and R-Drop, Liang
et al., 2021, here with input noise instead of a second dropout draw).

A second forward pass of the `predict:` examples runs with noise on the question's input
embeddings: Gaussian noise of `consistency_amount` times the embeddings' root-mean-square
(`consistency_noise=embedding`), or each question token's embedding zeroed with probability
`consistency_amount` (`dropout`). The term is KL(clean || noisy) between the student's full
next-token distributions at the answer tokens, the clean side held fixed (no gradient), so
the noisy prediction is pulled towards the clean one. Weight `consistency_lam`.
"""

from __future__ import annotations

from typing import Callable

import torch

from trainer.settings import TrainConfig
from trainer.losses.base import LossContext, register


def embedding_noise(kind: str, amount: float) -> Callable[[torch.Tensor, torch.Tensor],
                                                          torch.Tensor]:
    """f(embeddings [B, L, D], where [B, L] bool) -> the embeddings, disturbed where asked."""
    def perturb(emb: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        where = where[..., None].to(emb.dtype)
        if kind == "embedding":
            rms = emb.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(emb.dtype)
            return emb + torch.randn_like(emb) * rms * amount * where
        keep = (torch.rand(emb.shape[:2], device=emb.device) >= amount)[..., None]
        return emb * torch.where(where.bool(), keep.to(emb.dtype), torch.ones_like(where))
    if kind not in ("embedding", "dropout"):
        raise ValueError(f"consistency noise must be 'embedding' or 'dropout', got {kind!r}")
    return perturb


def consistency_kl(clean_logits: torch.Tensor, noisy_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(clean) || softmax(noisy)), clean held fixed."""
    if clean_logits.shape[0] == 0:
        return noisy_logits.sum() * 0.0
    clean = torch.log_softmax(clean_logits.detach().float(), -1)
    noisy = torch.log_softmax(noisy_logits.float(), -1)
    return (clean.exp() * (clean - noisy)).sum(-1).mean()


@register
class Consistency:
    name, part, needs, switch = "consistency", "predict", frozenset(), "consistency_lam"

    def __init__(self, weight: float, kind: str, amount: float):
        self.weight, self.perturb = weight, embedding_noise(kind, amount)

    def weight_at(self, step: int) -> float:
        return self.weight

    @classmethod
    def from_settings(cls, t: TrainConfig) -> "Consistency | None":
        if t.consistency_lam <= 0:
            return None
        return cls(t.consistency_lam, t.consistency_noise, t.consistency_amount)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        clean = ctx.outputs(self.part)
        noisy, _ = ctx.student.target_logits(ctx.model, ctx.batch[self.part],
                                             perturb=self.perturb)
        return consistency_kl(clean.logits, noisy)
