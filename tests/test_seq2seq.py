"""Encoder-decoder students (T5-style, as in the Distilling Step-by-Step paper): a tiny
randomly initialised T5 built from a config, with the embedded model's tokenizer (no hub)."""

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.run_folder import RunFolder
from stages.commands.cli import run_stages
from trainer.examples import DSSCollator, build_examples
from trainer.students import student_for
from trainer.students.seq2seq import Seq2SeqStudent


def test_target_logits_are_the_models_own_teacher_forcing(tiny_t5):
    from pipeline.models import load_tokenizer

    student = student_for(tiny_t5)
    assert isinstance(student, Seq2SeqStudent) and student.task_type == "SEQ_2_SEQ_LM"
    tok = load_tokenizer(tiny_t5)
    model = student.load(tiny_t5, "float32").eval()
    rows = [{"question": "q" * n, "gold": str(n), "pred_answer": str(n),
             "rationale": f"{n} + 0 = {n}." * n} for n in (1, 3, 5)]
    batch = DSSCollator(student, tok.pad_token_id)(build_examples(rows, tok, student, 64))
    for part in ("predict", "explain"):
        b = batch[part]
        with torch.no_grad():
            logits, targets = student.target_logits(model, b)
            ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        labels=b["labels"])
        assert torch.equal(targets, b["labels"][b["labels"] != -100])
        assert torch.allclose(torch.nn.functional.cross_entropy(logits, targets), ref.loss,
                              atol=1e-5)


@pytest.mark.slow
def test_a_t5_student_trains_with_lora_and_is_scored_in_both_modes(tiny_t5, tmp_path):
    """Imported traces (no teacher needed), a T5 student with LoRA on its attention and
    consistency regularisation on the encoder's embeddings, then eval: base, predict:, explain:."""
    rows = [{"question": f"Tom has {a} apples. He gets {b} more. How many now?",
             "rationale": f"{a} + {b} = {a + b}.", "answer": str(a + b)}
            for a in range(2, 8) for b in (1, 2)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    settings = [f"train.student={tiny_t5}", "train.max_steps=4", "train.batch_size=4",
                "train.dtype=float32", "train.consistency_lam=0.2",
                "train.consistency_noise=dropout", "eval.n=6", "eval.dtype=float32",
                "eval.systems=[base,predict,explain]", "eval.max_new_tokens=8",
                "task.n_test=6"]
    cfg = load_config("configs/demo.yaml", settings)
    run = RunFolder(tmp_path / "run")
    from stages.commands.import_traces import import_traces

    import_traces(cfg, run, "table", [str(tmp_path / "t.jsonl")])
    run_stages(["filter", "train", "eval"], cfg, run)
    manifest = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    assert manifest["facts"]["student_kind"] == "seq2seq"
    assert manifest["facts"]["explain_targets"] == "text"
    adapter = json.loads((tmp_path / "run" / "train" / "adapter" /
                          "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert sorted(adapter["target_modules"]) == ["k", "o", "q", "v"]
    log = [json.loads(x) for x in (tmp_path / "run" / "train" / "log.jsonl").read_text()
           .splitlines()]
    assert any("loss_consistency" in r for r in log)
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert [r["system"] for r in report["results"]] == ["base", "predict", "explain"]
    assert all(r["n"] == 6 for r in report["results"])
