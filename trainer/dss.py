"""The multi-task Trainer: the loss is the weighted sum of the settings' loss terms.

With the default terms that is Distilling Step-by-Step (Hsieh et al., 2023),
`alpha * L_predict + (1 - alpha) * L_explain`, optionally with KD from the stored top-k on the
explain targets (`trainer.losses`). Built on TRL's SFTTrainer (a transformers Trainer), so
its config names, checkpoints, resume, logging integrations (TensorBoard, wandb, ...),
gradient checkpointing, optimizers and the accelerate/DeepSpeed launchers come with it; the
examples (built from the kept traces, `trainer.examples`) and the loss are ours. Every forward
goes through the model the Trainer hands in (wrapped or not).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback
from trl import SFTTrainer

from pipeline.sealed import seal
from trainer.losses.base import LossContext, LossTerm
from trainer.students.base import Student


class DSSTrainer(SFTTrainer):
    """Trains on (predict, explain) pairs with the loss `sum_i w_i(step) * term_i`.

    A part's forward pass runs only when a term on it has a non-zero weight at this step
    (answer-only training never runs the explain pass; a warm-up skips it while its weight is
    0). Each term's mean value is logged as `loss_<name>`.
    """

    def __init__(self, *args, terms: list[LossTerm], student: Student, **kwargs):
        super().__init__(*args, **kwargs)
        if not terms:
            raise ValueError("no loss terms: with these settings nothing would be trained "
                             "(check train.alpha and train.kd_lam)")
        self.terms, self.student = terms, student
        self._logged: dict[str, list[float]] = defaultdict(list)
        self._eval_logged: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step
        ctx = LossContext(model, inputs, self.student, step)
        weighted = [(term, term.weight_at(step)) for term in self.terms]
        # all weights 0 (a warm-up start with alpha = 0): a zero loss that still has a graph
        active = [(term, w) for term, w in weighted if w != 0] or weighted
        loss = 0.0
        logged = self._logged if model.training else self._eval_logged
        for term, weight in active:
            value = term(ctx)
            logged[f"loss_{term.name}"].append(value.detach().item())
            loss = loss + weight * value
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The held-out loss (`train.heldout_share`): the same weighted terms, no logits kept
        (the examples are pairs, which the Trainer's own step does not take)."""
        import torch

        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        for when, logged, prefix in (("loss", self._logged, ""),
                                     ("eval_loss", self._eval_logged, "eval_")):
            if when in logs:
                for name, values in logged.items():
                    if values:
                        logs[prefix + name] = round(sum(values) / len(values), 4)
                        values.clear()
        super().log(logs, start_time)


class JsonlLogCallback(TrainerCallback):
    """Keeps every log record and hands the whole log to `write` after each one (rewritten,
    never appended to: object stores cannot append). A resumed run first drops the records
    of steps after its checkpoint, so no step is logged twice."""

    def __init__(self, write: Callable[[list[dict]], None], records: list[dict] | None = None):
        self.write = write
        self.records = list(records or [])

    def on_train_begin(self, args, state, control, **kwargs):
        self.records = [r for r in self.records if r.get("step", 0) <= state.global_step]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.records.append({"step": state.global_step, **logs})
            self.write(self.records)


class OnSave(TrainerCallback):
    """Calls `then()` in the main process after every checkpoint is saved (to mirror the
    checkpoints to a run folder on object storage)."""

    def __init__(self, then: Callable[[], None]):
        self.then = then

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.then()


class SealCheckpoints(TrainerCallback):
    """Seals each checkpoint once the Trainer has saved all of it (main process)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                seal(folder)
