"""Served and scored by others: the student's LoRA adapter served by vLLM's OpenAI-compatible
server (`--enable-lora`, the adapter added while the run's one server runs, through the loader
`--lora-modules` uses at start), and the exported student scored by lm-evaluation-harness on
the held-out set, in agreement with our own eval."""

import json
import re
import subprocess
import sys

import pytest


N_TEST = 60
BASE = ["task.n_test=60", "train.dtype=float32", "eval.dtype=float32", "train.batch_size=8",
        "train.max_steps=40", "train.learning_rate=2e-3", "train.save_steps=1000",
        "train.logging_steps=10"]


def _rationale(question: str, gold: str) -> str | None:
    """A correct one-step rationale for a demo question (None for other shapes)."""
    a, b = (int(x) for x in re.findall(r"\d+", question)[:2])
    for op, value in (("+", a + b), ("-", a - b)):
        if str(value) == gold:
            return f"We start with {a} and {'add' if op == '+' else 'take away'} {b}, so " \
                   f"{a} {op} {b} = {value}."
    return None


@pytest.fixture(scope="module")
def student(tmp_path_factory, embedded_path):
    """A student trained for 40 steps on correct rationales of the demo's training questions
    (imported, no teacher needed), scored by our eval (transformers) and exported."""
    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from pipeline.tasks import load_split
    from stages.commands.cli import main as cli

    root = tmp_path_factory.mktemp("served")
    cfg = load_config("configs/demo.yaml", BASE)
    rows = []
    for r in load_split(cfg.task, "train").to_pylist():
        if len(re.findall(r"\d+", r["question"])) == 2 and _rationale(r["question"], r["gold"]):
            rows.append({"question": r["question"], "answer": r["gold"],
                         "rationale": _rationale(r["question"], r["gold"])})
    (root / "traces.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:240]))
    where = ["--run", "s", "--runs-dir", str(root / "runs")]
    assert cli(["import", *where, "--kind", "table", "--from", str(root / "traces.jsonl"),
                *BASE]) == 0
    for stage in ("filter", "train"):
        assert cli([stage, *where, *BASE]) == 0
    assert cli(["eval", *where, *BASE, "generate.backend=hf", "eval.systems=[predict,explain]",
                "eval.batch_size=32"]) == 0
    assert cli(["export", *where]) == 0
    run = RunFolder(root / "runs" / "s")
    return {"root": root, "run": run, "cfg": cfg,
            "adapter": root / "runs" / "s" / "train" / "adapter",
            "export": root / "runs" / "s" / "export" / "train",
            "report": run.stage("eval").read_json("report.json")}


def _post(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_vllm_serves_the_students_lora_adapter(student, vllm_server):
    import urllib.request

    from pipeline.tasks import load_split
    from trainer.examples import task_prompt

    questions = [r["question"] for r in load_split(student["cfg"].task, "test").to_pylist()[:8]]
    report = {r["system"]: r for r in student["report"]["results"]}
    assert report["predict"]["accuracy"] > 0.2  # a student that learnt something
    server = vllm_server  # the run's server (float32): the adapter is added while it runs
    server.load_adapter("served-student", student["adapter"])
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=30) as resp:
        served = [m["id"] for m in json.loads(resp.read())["data"]]
    assert "served-student" in served and "smollm2-135m-instruct" in served

    def answers(model):
        out = _post(f"{server.base_url}/completions", {
            "model": model, "prompt": [task_prompt("predict", q) for q in questions],
            "max_tokens": 8, "temperature": 0})
        return [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]

    lora, bare = answers("served-student"), answers("smollm2-135m-instruct")
    ours = {r["id"]: r for r in _predictions(student["run"], "predict")}
    test_ids = [r["id"] for r in load_split(student["cfg"].task, "test").to_pylist()[:8]]
    expected = [ours[i]["output"] for i in test_ids]
    # the served adapter answers as our eval's student did (first line, greedy), the bare
    # model does not
    same = sum(a.strip().splitlines()[0].strip() == e.strip() if a.strip() else e == ""
               for a, e in zip(lora, expected))
    assert same >= 7, list(zip(lora, expected))
    assert lora != bare


def test_the_server_command_serves_adapters_named_at_start_or_loaded_later(embedded_path,
                                                                          monkeypatch, tmp_path):
    from stages.backends.vllm_server import LocalVLLMServer

    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    log = {"log_path": tmp_path / "server.log"}  # no log file left in the system's temp folder
    named = LocalVLLMServer("smollm2-135m-instruct", lora_modules={"dss": "runs/a/adapter"},
                            max_lora_rank=32, **log)
    args = named.command()
    assert args[args.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in args
    assert args[args.index("--lora-modules") + 1] == "dss=runs/a/adapter"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in named.environment()
    with pytest.raises(RuntimeError, match="runtime_lora=True"):
        named.load_adapter("later", "runs/b/adapter")  # refused before any request is sent
    later = LocalVLLMServer("smollm2-135m-instruct", runtime_lora=True, **log)
    assert "--enable-lora" in later.command() and "--lora-modules" not in later.command()
    assert later.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" not in LocalVLLMServer("smollm2-135m-instruct", **log).command()


def _predictions(run, system: str) -> list[dict]:
    folder = run.stage("eval")
    manifest = folder.manifest()
    rows = []
    for shard in manifest["shards"]:
        if shard["name"].startswith(system):
            rows += folder.read_checked(shard["outputs"]["predictions"]).to_pylist()
    return rows


@pytest.mark.slow
def test_lm_eval_scores_the_exported_student_like_our_eval(student, tmp_path):
    from stages.commands.lm_eval_task import write_tasks

    write_tasks(student["cfg"], "check", tmp_path / "tasks")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={student['export']}", "dtype=float32", "--tasks",
           "stepdistill_check_predict", "stepdistill_check_explain", "--include_path",
           str(tmp_path / "tasks"), "--batch_size", "32", "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = list(out.rglob("results_*.json"))
    scores = json.loads(results.read_text())["results"]
    ours = {r["system"]: r["accuracy"] for r in student["report"]["results"]}
    for mode in ("predict", "explain"):
        theirs = scores[f"stepdistill_check_{mode}"]["exact_match,answer"]
        # the same greedy answers, read by two answer extractors: within 3 of 60 questions
        assert abs(theirs - ours[mode]) <= 3 / N_TEST, (mode, theirs, ours[mode])
    assert ours["predict"] > 0.2


def test_the_shipped_lm_eval_tasks_are_the_demos_held_out_set(tmp_path):
    """`lm_eval/demo/` is what the task writer makes of configs/demo.yaml today."""
    from pathlib import Path

    from pipeline.config import load_config
    from stages.commands.lm_eval_task import write_tasks

    shipped = Path(__file__).resolve().parent.parent / "lm_eval" / "demo"
    written = write_tasks(load_config("configs/demo.yaml"), "demo", tmp_path,
                          data_file="lm_eval/demo/test.jsonl")
    assert sorted(p.name for p in written) == sorted(p.name for p in shipped.iterdir())
    for path in written:
        assert path.read_text() == (shipped / path.name).read_text(), path.name
