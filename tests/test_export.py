"""`distill export`: a merged model that transformers loads by folder name and that answers
like the adapter, the PEFT adapter naming its real base model, a model card, the upload to a
local folder target; clear errors for what is not there."""

import json

import pytest

from stages.commands.cli import main as cli

TRAIN = ["train.dtype=float32", "train.batch_size=2", "train.max_steps=8",
         "train.learning_rate=3e-3", "train.logging_steps=4", "train.save_steps=100"]


def _greedy(model, tok, prompts):
    import torch

    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_export_merged_and_adapter_only(imported_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import resolve_model
    from trainer.examples import task_prompt

    where = ["--run", "r", "--runs-dir", str(imported_run.parent)]
    # nothing trained yet: one line, and no export folder
    assert cli(["export", *where]) == 1
    assert "no finished student" in capsys.readouterr().err
    assert not (imported_run / "export").exists()
    assert cli(["train", *where, *TRAIN]) == 0

    target = tmp_path / "hub-target"
    assert cli(["export", *where, "--push-to-hub", str(target), "--check", "3"]) == 0
    assert "check: 6 of 6 greedy answers" in capsys.readouterr().err
    out = imported_run / "export" / "train"
    config = json.loads((out / "config.json").read_text())
    assert config["_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct")
    for part in ("## Teacher and data", "question coverage: ", "traces in", "## Training",
                 "`train.max_steps` | `8`",
                 "## Evaluation", "predict: <question>", "majority vote (self-consistency)",
                 'llm = LLM("this-folder")', "SamplingParams(n=k, temperature=0.7",
                 'r"-?\\d+(?:\\.\\d+)?"'):
        assert part in card, part
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in out.iterdir())

    # the merged model, loaded by folder name, answers like base + adapter (greedy)
    questions = [f"Ann has {a} pens. She gets {b} more. How many pens does she have now?"
                 for a in range(2, 7) for b in range(1, 3)]
    prompts = [task_prompt(mode, q) for q in questions for mode in ("predict", "explain")]
    assert len(prompts) == 20
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"))
    before = _greedy(base, tok, prompts)
    adapter = PeftModel.from_pretrained(base, str(imported_run / "train" / "adapter")).eval()
    with_adapter = _greedy(adapter, tok, prompts)
    assert _greedy(merged, tok, prompts) == with_adapter
    assert with_adapter != before  # the training changed the answers: the check means something

    assert cli(["export", *where, "--adapter-only", "--out", str(tmp_path / "a")]) == 0
    adapter_config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    adapter_card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: peft" in adapter_card
    assert "enable_lora=True" in adapter_card and "lora_request=adapter" in adapter_card
    assert not (tmp_path / "a" / "model.safetensors").exists()


@pytest.mark.parametrize("args, says", [
    (["--run", "nope"], "no run folder"),
])
def test_export_errors_are_one_line(tmp_path, capsys, args, says):
    assert cli(["export", "--runs-dir", str(tmp_path), *args]) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()
