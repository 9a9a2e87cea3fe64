"""Loss terms: the training loss is a weighted sum of small pieces taken from the settings.

A term (the `LossTerm` protocol) names the part of the batch it works on (`predict` or
`explain`), says how it is made from the train settings (`from_settings`, None when it is off)
and which setting switches it on, and computes its value from a `LossContext`: the student's
logits at that part's target positions (run once per part and step, and shared by every term
on the part), the batch itself (a term's own fields, such as
the teacher's top-k rows), and the model, for a term that needs a forward pass of its own.
Its weight can follow a schedule over the optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from trainer.settings import TrainConfig
from pipeline.registry import Registry


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


class LossTerm(Protocol):
    """One weighted piece of the loss (each a small class of its own file, sharing helpers
    by function, never by inheritance).

    name: logged as `loss_<name>`; part: the part of the batch it works on (`predict` or
    `explain`); needs: extra per-target fields the examples must carry (`topk` = the teacher's
    top-k rows); switch: the train setting that turns it on, off at its default (a term that
    needs the top-k is switched off there when the traces cannot give it); weight: its weight.
    `from_settings(t)` (a classmethod) makes it from the train settings, None when they leave
    it out.
    """

    name: str
    part: str
    needs: frozenset[str]
    switch: str
    weight: float

    def weight_at(self, step: int) -> float:
        """The weight at optimizer step `step` (a schedule may ramp it)."""

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        """The term's value (a scalar) at this step."""


def scheduled(weight: float, schedule: Callable[[int], float] | None, step: int) -> float:
    """`weight` at `step` under `schedule` (None: constant)."""
    return weight * (schedule(step) if schedule is not None else 1.0)


def teacher_rows(ctx: LossContext, part: str):
    """(student logits, their log-sum-exp, teacher top-k ids, teacher top-k log-probabilities)
    at the part's target positions that carry a teacher row (the end-of-sequence target, and
    answers not found in the trace, have none)."""
    out, batch = ctx.outputs(part), ctx.batch[part]
    ids, lps = batch["topk_ids"], batch["topk_logprobs"]
    has = (ids >= 0).any(-1)
    return out.logits[has], out.lse[has], ids[has], lps[has]


# every file of trainer/losses/ registers its terms here
TERMS: Registry = Registry("loss term", "trainer.losses")


def register(cls: type) -> type:
    """Class decorator: make a term available to `terms_from_settings`."""
    return TERMS.register(cls)


def predict_schedule(t: TrainConfig) -> Callable[[int], float] | None:
    """The predict warm-up: the predict terms' weight grows linearly from 0 over the first
    `predict_warmup_steps` optimizer steps (the student first learns to write rationales,
    before the short answer targets, learnt much faster, can take over its explain: mode)."""
    steps = t.predict_warmup_steps
    if steps <= 0:
        return None
    return lambda step: min(1.0, step / steps)


def explain_schedule(t: TrainConfig) -> Callable[[int], float] | None:
    """The explain warm-up: the explain terms' weight grows linearly from 0 over the first
    `explain_warmup_steps` optimizer steps (the student first learns to answer)."""
    steps = t.explain_warmup_steps
    if steps <= 0:
        return None
    return lambda step: min(1.0, step / steps)
