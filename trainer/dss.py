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

import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback
from trl import SFTTrainer

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


SEAL = "complete.json"  # written into a checkpoint folder once everything in it is saved


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal_checkpoint(folder: Path) -> None:
    """Record every file of a saved checkpoint (size and sha256) in its `complete.json`."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SEAL}
    tmp = folder / f".{SEAL}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / SEAL)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it is complete and as saved). One
    without a seal (saved before seals existed) counts when its trainer state, written last
    by the Trainer, is there and readable."""
    seal = folder / SEAL
    if not seal.is_file():
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return "its save was interrupted (no complete.json, no readable trainer_state.json)"
        return None
    try:
        files = json.loads(seal.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "its complete.json cannot be read"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"] or _digest(path) != want["sha256"]:
            return f"{name} is not as saved"
    return None


def last_complete_checkpoint(folder: Path, say: Callable[[str], None]) -> str | None:
    """The newest checkpoint under `folder` that is complete; newer ones that are not (a kill
    during a save, a damaged file) are said and removed, so the Trainer's rotation and later
    saves never meet them."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for _, path in sorted(found, reverse=True):
        why = checkpoint_problem(path)
        if why is None:
            return str(path)
        say(f"{path.name} is incomplete ({why}): skipped and removed; resuming from the "
            "one before it")
        shutil.rmtree(path, ignore_errors=True)
    return None


class SealCheckpoints(TrainerCallback):
    """Seals each checkpoint once the Trainer has saved all of it (main process)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                seal_checkpoint(folder)
