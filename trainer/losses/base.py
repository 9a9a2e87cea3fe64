"""Loss terms: the training loss is a weighted sum of small pieces taken from the settings.

A term names the part of the batch it works on (`predict` or `explain`), says how it is made
from the train settings (`from_settings`, None when it is off), and computes its value from a
`LossContext`: the student's logits at that part's target positions (run once per part and
step, and shared by every term on the part), the batch itself (a term's own fields, such as
the teacher's top-k rows), and the model, for a term that needs a forward pass of its own.
Its weight can follow a schedule over the optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from pipeline.config import TrainConfig


@dataclass
class TargetOutputs:
    """The student's outputs at one part's target positions, row by row in sequence order."""

    logits: torch.Tensor     # [N, V], float32
    targets: torch.Tensor    # [N]
    lse: torch.Tensor        # [N], log-sum-exp of the logits (what a cross-entropy needs)


class LossContext:
    """What the terms see at one step."""

    def __init__(self, model: torch.nn.Module, batch: dict, student, step: int):
        self.model, self.batch, self.student, self.step = model, batch, student, step
        self._outputs: dict[str, TargetOutputs] = {}

    def outputs(self, part: str) -> TargetOutputs:
        """The student's target-position logits for `part`, computed on first use."""
        if part not in self._outputs:
            logits, targets = self.student.target_logits(self.model, self.batch[part])
            logits = logits.float()
            self._outputs[part] = TargetOutputs(logits, targets, torch.logsumexp(logits, -1))
        return self._outputs[part]


class LossTerm:
    """One weighted piece of the loss. Subclasses set `name` (logged as `loss_<name>`),
    `part`, and `needs` (extra per-target fields the examples must carry: `topk` = the
    teacher's top-k rows), and implement `from_settings` and `__call__`."""

    name: ClassVar[str]
    part: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weight: float, schedule: Callable[[int], float] | None = None):
        self.weight = weight
        self.schedule = schedule

    def weight_at(self, step: int) -> float:
        return self.weight * (self.schedule(step) if self.schedule is not None else 1.0)

    @classmethod
    def from_settings(cls, t: TrainConfig) -> "LossTerm | None":
        """The term as the settings ask for it, or None when they leave it out."""
        raise NotImplementedError

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        """The term's value (a scalar) at this step."""
        raise NotImplementedError


TERMS: dict[str, type[LossTerm]] = {}


def register(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: make a term available to `terms_from_settings`."""
    if cls.name in TERMS and TERMS[cls.name] is not cls:
        raise ValueError(f"two loss terms are named {cls.name!r}: "
                         f"{TERMS[cls.name].__qualname__} and {cls.__qualname__}")
    TERMS[cls.name] = cls
    return cls


def explain_schedule(t: TrainConfig) -> Callable[[int], float] | None:
    """The explain warm-up: the explain terms' weight grows linearly from 0 over the first
    `explain_warmup_steps` optimizer steps (the student first learns to answer)."""
    steps = t.explain_warmup_steps
    if steps <= 0:
        return None
    return lambda step: min(1.0, step / steps)
