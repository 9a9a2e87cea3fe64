"""The student's training arguments: TRL's `SFTConfig` made from the train settings, with
`train.args` passed through (checked against the real dataclass first)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
from pathlib import Path

from pipeline.log import quiet

# SFTConfig / TrainingArguments fields that a train.* key of ours sets
OWN = {"output_dir": None, "per_device_train_batch_size": "train.batch_size",
       "gradient_accumulation_steps": "train.grad_accum",
       "learning_rate": "train.learning_rate", "num_train_epochs": "train.epochs",
       "max_steps": "train.max_steps", "warmup_steps": "train.warmup_ratio",
       "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay",
       "logging_steps": "train.logging_steps", "save_steps": "train.save_steps",
       "save_total_limit": "train.save_total_limit", "seed": "train.seed",
       "data_seed": "train.seed", "report_to": "train.report_to",
       "logging_dir": "train.report_to", "max_length": "train.max_length",
       "remove_unused_columns": None, "dataset_kwargs": None, "resume_from_checkpoint": None,
       "eval_steps": "train.eval_steps", "prediction_loss_only": None}
# what cannot work with the trainer's examples, and why
REFUSED = {
    "packing": "each trace is a predict: and an explain: example trained in two forward passes "
               "with their own loss terms and per-token top-k rows; packing joins unrelated "
               "sequences into one row, which these terms do not take",
    "padding_free": "the examples are padded by the student (`Student.collate`), which the "
                    "loss terms index by position",
    "completion_only_loss": "the loss is always on the target tokens only (the prompt is "
                            "masked by the student's encoding)",
    "assistant_only_loss": "the examples are task-prefixed prompts, not chat conversations",
    "dataset_text_field": "the examples are built from the kept traces, not a text column",
}


def _sft_config():
    from trl import SFTConfig

    return SFTConfig


def check_args(args: dict) -> list[str]:
    """What is wrong with `train.args` (empty: nothing), one line per field."""
    known = {f.name for f in dataclasses.fields(_sft_config()) if f.init}
    problems = []
    for key in args:
        if key in REFUSED:
            problems.append(f"train.args.{key}: not taken: {REFUSED[key]}")
        elif key in OWN:
            own = OWN[key]
            problems.append(f"train.args.{key}: set by " + (
                f"{own}; set that instead" if own else "the train stage itself"))
        elif key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
            problems.append(f"train.args.{key}: not a field of TRL's SFTConfig or transformers' "
                            "TrainingArguments" + (f"; did you mean '{close[0]}'?" if close
                                                   else ""))
    return problems


def sft_config(t, output_dir: Path, use_cpu: bool):
    """The SFTConfig of a student: our settings, the defaults this stage has always trained
    with where SFTConfig's differ (float32 maths over the loaded dtype, no gradient
    checkpointing, a cosine schedule), then `train.args` on top."""
    problems = check_args(t.args)
    if problems:
        raise ValueError("train.args has field(s) that cannot be used:\n  "
                         + "\n  ".join(problems))
    report_to = [r for r in t.report_to if r != "none"] or "none"
    base = dict(
        output_dir=str(output_dir), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs, max_steps=t.max_steps, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, lr_scheduler_type="cosine", logging_steps=t.logging_steps,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed,
        data_seed=t.seed, report_to=report_to, remove_unused_columns=False,
        use_cpu=use_cpu, dataloader_num_workers=0, logging_first_step=True,
        disable_tqdm=quiet(), bf16=False, fp16=False, gradient_checkpointing=False,
        max_length=t.max_length, dataset_kwargs={"skip_prepare_dataset": True})
    if t.heldout_share > 0:
        base.update(eval_strategy="steps", eval_steps=t.eval_steps or t.save_steps,
                    per_device_eval_batch_size=t.batch_size, prediction_loss_only=True)
    try:
        return _sft_config()(**{**base, **t.args})
    except (ValueError, TypeError) as e:
        raise ValueError(f"train.args: TRL/transformers refuse these arguments: {e}") from None


@contextlib.contextmanager
def tensorboard_dir(folder: Path):
    """Within it, transformers' TensorBoard callback (made when the trainer is) writes its
    event files to `folder` (unless the user set TENSORBOARD_LOGGING_DIR themselves)."""
    key = "TENSORBOARD_LOGGING_DIR"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
