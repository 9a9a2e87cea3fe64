"""The generate stage's own logic, with a scripted teacher at the backend boundary."""

import numpy as np
import pyarrow as pa
import pytest

import stages.generate.stage as generate
from pipeline.schema import logical
from pipeline.config import ConfigError, load_config
from pipeline.prompts import PromptTemplate
from pipeline.run_folder import RunFolder
from pipeline.stage import Shard
from stages.backends.base import Generation


class ScriptedTeacher:
    """Answers every prompt with a fixed trace; fails on questions that contain 'Farid'."""

    name = "scripted"

    def __init__(self):
        self.prompts = []

    def facts(self):
        return {"backend": "scripted", "teacher": "scripted", "vocab_size": 10,
                "tokenizer_fingerprint": "0" * 16, "logprob_source": "raw_logits"}

    def generate(self, prompts, settings):
        if any("Farid" in p for p in prompts):
            raise RuntimeError("teacher fell over on Farid")
        self.prompts.extend(prompts)
        k = settings.top_k
        out = []
        for _ in prompts:
            n = 3
            out.append([Generation(" 1 + 1 = 2. The answer is 2.", "stop",
                                   np.arange(n, dtype=np.int32), np.full(n, -0.1, np.float32),
                                   np.tile(np.arange(k, dtype=np.int32), (n, 1)),
                                   np.full((n, k), -1.0, np.float32))
                        for _ in range(settings.n)])
        return out


@pytest.fixture
def teacher():
    return ScriptedTeacher()


def run(cfg, tmp_path, teacher):
    """The generate stage with the scripted teacher handed in as its factory."""
    return generate.main(cfg, tmp_path, teacher=lambda: teacher)


def traces(tmp_path, manifest):
    return RunFolder(tmp_path).stage("generate").read_tables(manifest["files"], each=logical)


def test_the_shard_function_alone_on_an_in_memory_table(teacher):
    cfg = load_config("configs/demo.yaml", ["generate.n_samples=3", "generate.top_k=4"])
    rows = pa.table({"id": ["a", "b"], "question": ["Anna has 2 apples.", "Ben has 3."],
                     "gold": ["2", None]})
    params = generate.GenerateSettings(cfg.generate, PromptTemplate(cfg.generate.prompt_template))
    out = generate.generate_shard(params, Shard.of("00000", rows), teacher)
    table = out.tables["traces"]
    assert table.column("id").to_pylist() == ["a"] * 3 + ["b"] * 3
    assert table.column("sample").to_pylist() == [0, 1, 2] * 2
    assert table.column("gold").to_pylist() == ["2"] * 3 + [None] * 3
    template = PromptTemplate(cfg.generate.prompt_template)
    assert table.column("prompt").to_pylist() == [template.render("Anna has 2 apples.")] * 3 \
        + [template.render("Ben has 3.")] * 3
    assert out.counters == {"rows": 2, "traces": 6, "errors": 0, "tokens": 18, "truncated": 0,
                            "prompt_tokens": 0, "completion_tokens": 18, "engine_s": 0.0,
                            "cost": 0.0}  # the ledger: no tokenizer, no engine time here
    assert out.facts["backend"] == "scripted" and len(teacher.prompts) == 2


def test_failing_rows_are_recorded_and_the_run_goes_on(tmp_path, teacher):
    cfg = load_config("configs/demo.yaml", ["task.n_train=40", "generate.rows_per_shard=16",
                                            "generate.n_samples=2", "generate.top_k=4"])
    manifest = run(cfg, tmp_path, teacher)
    table = traces(tmp_path, manifest)
    rows = table.to_pylist()
    assert len(rows) == 80 and len({(r["id"], r["sample"]) for r in rows}) == 80
    failed = [r for r in rows if r["error"]]
    assert failed and all("Farid" in r["question"] for r in failed)
    assert all("teacher fell over" in r["error"] and r["finish_reason"] == "error"
               and r["token_ids"] == [] for r in failed)
    ok = [r for r in rows if not r["error"]]
    assert all(len(r["topk_ids"]) == 3 and len(r["topk_ids"][0]) == 4 for r in ok)
    c = manifest["counters"]
    assert c["errors"] == len(failed) and c["traces"] == len(ok) and c["rows"] == 40
    assert manifest["facts"]["k"] == 4 and manifest["facts"]["backend"] == "scripted"
    assert manifest["facts"]["sampling"]["n"] == 2


def test_batch_size_is_not_part_of_the_fingerprint_but_sampling_is(tmp_path, teacher):
    base = ["task.n_train=8", "generate.rows_per_shard=4"]
    first = run(load_config("configs/demo.yaml", base), tmp_path, teacher)
    n = len(teacher.prompts)
    again = run(load_config("configs/demo.yaml", base + ["generate.batch_size=2"]), tmp_path,
                teacher)
    assert len(teacher.prompts) == n and again["fingerprint"] == first["fingerprint"]
    changed = run(load_config("configs/demo.yaml", base + ["generate.temperature=0.9"]),
                  tmp_path, teacher)
    assert changed["fingerprint"] != first["fingerprint"] and len(teacher.prompts) == 2 * n


def test_growing_the_task_generates_only_the_new_shards(tmp_path, teacher):
    run(load_config("configs/demo.yaml", ["task.n_train=8", "generate.rows_per_shard=4"]),
        tmp_path, teacher)
    before = len(teacher.prompts)
    m = run(load_config("configs/demo.yaml", ["task.n_train=12", "generate.rows_per_shard=4"]),
            tmp_path, teacher)
    assert m["shards_reused"] == 2 and m["shards_written"] == 1
    assert len(teacher.prompts) - before == 4


def test_prompt_template_errors_are_clear(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("no placeholder")
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate(str(bad))
    with pytest.raises(FileNotFoundError, match="data/prompts"):
        PromptTemplate(str(tmp_path / "missing.txt"))


def test_only_the_settings_of_the_chosen_backend_are_fingerprinted():
    from pipeline.fingerprints import fingerprint
    from stages.generate.stage import generate_fingerprinted

    def fp(*over):
        return fingerprint(generate_fingerprinted(load_config("configs/demo.yaml", list(over))))

    hf = fp("generate.backend=hf")
    assert fp("generate.backend=hf", "generate.base_url=http://elsewhere/v1",
              "vllm.max_model_len=4096") == hf
    assert fp("generate.backend=vllm") != hf
    vllm = fp("generate.backend=vllm")
    # speed and memory knobs keep the shards; what the engine samples from does not
    assert fp("generate.backend=vllm", "vllm.max_num_seqs=8", "vllm.cpu_threads=0-1",
              "vllm.gpu_memory_utilization=0.5", "vllm.enforce_eager=false") == vllm
    assert fp("generate.backend=vllm", "vllm.dtype=float32") != vllm
    assert fp("generate.backend=vllm", "vllm.logprobs_mode=processed_logprobs") != vllm
    api = fp("generate.backend=openai", "generate.base_url=http://a/v1")
    assert fp("generate.backend=openai", "generate.base_url=http://a/v1",
              "generate.dtype=float32", "generate.concurrency=99") == api
    assert fp("generate.backend=openai", "generate.base_url=http://a/v1",
              "generate.endpoint=completions") != api


def test_whole_shards_go_to_engines_that_schedule_themselves(tmp_path, teacher):
    teacher.whole_shards = True
    cfg = load_config("configs/demo.yaml", ["task.n_train=20", "generate.rows_per_shard=10",
                                            "generate.batch_size=2", "generate.n_samples=1"])
    calls = []
    real = teacher.generate
    teacher.generate = lambda prompts, s: calls.append(len(prompts)) or real(prompts, s)
    run(cfg, tmp_path, teacher)
    assert [c for c in calls if c != 1] == [10, 10]  # (rows that fail are retried alone)


def test_a_hint_and_a_predict_target_write_the_gold_answer_as_the_traces_do(teacher):
    """A task file's `6.0` is shown in a hinted prompt, and taught as the `predict:` target,
    in the answer kind's canonical form (`6`), the way the teacher's traces write it."""
    from stages.checks.answers import AnswerChecker
    from trainer.examples import PREDICT, predict_example, task_prompt
    from trainer.students.causal_lm import CausalLMStudent

    cfg = load_config("configs/demo.yaml", ["generate.n_samples=1", "generate.top_k=4"])
    canonical = AnswerChecker("numeric").canonical
    rows = pa.table({"id": ["a", "b"], "question": ["Mia has 2.5 m and 3.5 m.", "Leo has 9."],
                     "gold": ["6.0", "1,200.50"], "first": [1, 1]})
    params = generate.GenerateSettings(cfg.generate,
                                       PromptTemplate("data/prompts/word_problems_hint.txt"),
                                       later_round=True, hint_answer=canonical)
    generate.generate_shard(params, Shard.of("00000", rows), teacher)
    assert [p.rsplit("\nQuestion: ", 1)[1].split("\n")[0] for p in teacher.prompts] == [
        "Mia has 2.5 m and 3.5 m. (The answer is 6.)", "Leo has 9. (The answer is 1200.5.)"]

    class Chars:  # one token per character
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    student = CausalLMStudent()
    example = predict_example({"question": "Mia has 2.5 m and 3.5 m.", "gold": "6.0"}, Chars(),
                              student, 64, canonical)
    prompt = len(task_prompt(PREDICT, "Mia has 2.5 m and 3.5 m."))
    assert [t for t in example["labels"] if t != -100] == [ord("6"), 0]
    assert example["input_ids"][prompt:] == [ord("6"), 0]
    from stages.train.stage import _predict_text

    sentence = _predict_text("The answer is {answer}.", canonical)
    assert sentence("6.0") == "The answer is 6." and sentence("{answer}") == "The answer is {answer}."
    example = predict_example({"question": "Q?", "gold": None, "pred_answer": "7"}, Chars(),
                              student, 64, sentence)
    assert [t for t in example["labels"] if t != -100][:-1] == [ord(c) for c in
                                                               "The answer is 7."]
    with pytest.raises(ConfigError, match="has no {answer} placeholder"):
        load_config("configs/demo.yaml", ["train.predict_template=The answer"])
    with pytest.raises(ConfigError, match="answer KD learns the teacher's own answer tokens"):
        load_config("configs/demo.yaml", ["train.predict_template=The answer is {answer}.",
                                          "train.answer_kd_lam=0.5"])
