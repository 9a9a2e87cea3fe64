"""Stage three on TRL: the SFTTrainer underneath, `train.args` passed through to SFTConfig
(checked against the real dataclass), TensorBoard event files in the run folder."""

import json

import pytest

from trainer.settings import TrainConfig
from pipeline.run_folder import RunFolder
from stages.commands.cli import main as cli
from trainer.arguments import check_args, sft_config

SMALL = ["train.dtype=float32", "train.batch_size=2", "train.max_steps=4",
         "train.logging_steps=1", "train.save_steps=100"]


def test_train_args_are_checked_against_the_real_dataclass():
    assert check_args({"lr_scheduler_type": "linear", "optim": "adafactor",
                       "gradient_checkpointing": True, "run_name": "x"}) == []
    (typo,) = check_args({"lr_schedular_type": "linear"})
    assert "not a field" in typo and "did you mean 'lr_scheduler_type'" in typo
    (own,) = check_args({"learning_rate": 1e-3})
    assert "train.learning_rate" in own
    (packing,) = check_args({"packing": True})
    assert "not taken" in packing and "two forward passes" in packing
    config = sft_config(TrainConfig(args={"max_grad_norm": 0.5, "optim": "adafactor"}),
                        "out", use_cpu=True)
    assert config.max_grad_norm == 0.5 and config.optim == "adafactor"
    assert config.lr_scheduler_type == "cosine" and not config.bf16  # ours where not set
    assert config.report_to == ["tensorboard"]
    with pytest.raises(ValueError, match="refuse"):
        sft_config(TrainConfig(args={"lr_scheduler_type": "no-such-schedule"}), "out", True)


def test_config_keys_lists_args_and_report_to(capsys):
    assert cli(["config", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert "\n  train.args = {}" in keys and "\n  train.report_to = ['tensorboard']" in keys


def test_training_writes_tensorboard_events_and_takes_train_args(imported_run, tiny_llama,
                                                                 capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunFolder(imported_run)
    args = ["train", "--run", "r", "--runs-dir", str(imported_run.parent),
            f"train.student={tiny_llama}"]
    # a mistyped field: one line, nothing trained, no traceback
    assert cli(args + SMALL + ["train.args.lr_schedular_type=linear"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lr_scheduler_type'" in err and "Traceback" not in err
    assert run.student("").manifest() is None

    assert cli(args + SMALL + ["train.args.lr_scheduler_type=constant",
                               "train.args.max_grad_norm=0.5"]) == 0
    folder = imported_run / "train"
    events = list((folder / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, list(folder.iterdir())
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/loss_predict" in tags
    rates = [e.value for e in acc.Scalars("train/learning_rate")]
    assert len(set(round(r, 9) for r in rates[1:])) == 1  # constant, as asked (after warm-up)
    log = [json.loads(line) for line in (folder / "log.jsonl").open()]
    assert max(r["grad_norm"] for r in log if "grad_norm" in r) > 0
    manifest = run.student("").manifest()
    assert manifest["settings"]["train"]["args"] == {"lr_scheduler_type": "constant",
                                                     "max_grad_norm": 0.5}
    assert "report_to" not in manifest["settings"]["train"]


def test_a_held_out_share_gives_a_held_out_loss_while_training(imported_run, tiny_llama):
    """`train.heldout_share` keeps whole questions out of training; their loss (every term)
    is computed every eval_steps and logged as eval_loss."""
    from stages.train.stage import hold_out, keep_share

    rows = [{"id": f"q{i}"} for i in range(400)]
    train, held = hold_out(rows, 0.25)
    assert len(train) + len(held) == 400 and 60 < len(held) < 140
    assert not {r["id"] for r in keep_share(train, 0.5)} & {r["id"] for r in held}

    args = ["train", "--run", "r", "--runs-dir", str(imported_run.parent),
            f"train.student={tiny_llama}"]
    assert cli(args + SMALL + ["train.heldout_share=0.4", "train.eval_steps=2"]) == 0
    log = [json.loads(line) for line in (imported_run / "train" / "log.jsonl").open()]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] > 0 and "eval_loss_predict" in r and "eval_loss_explain" in r
               for r in evals)
    trained = [r for r in log if "loss" in r and "loss_predict" in r]
    assert trained and all("eval_loss_predict" not in r for r in trained)
    manifest = RunFolder(imported_run).stage("train").manifest()
    assert manifest["counters"]["traces"] < 6  # the held-out questions were not trained on
