"""`distill iterate` (the student as the next sampler, the teacher scoring its traces) and
self-consistency at answer time: majority votes, the teacher's scoring against its own
generation, and a two-round loop on tiny settings (reruns, a kill, a changed round-2 setting)."""

import json

import numpy as np
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.run_folder import RunFolder
from pipeline.schema import logical
from stages.checks.answers import NO_ANSWER, answer_checker
from stages.eval.stage import majority_vote


def test_majority_vote_counts_equal_answers_as_one_and_breaks_ties_by_the_first_sample():
    key = answer_checker(load_config("configs/demo.yaml")).key
    assert majority_vote(["8", "7", "8.0", "7"], key) == ("8", 2)   # 8 came first
    assert majority_vote(["7", "8", "8", "7"], key) == ("7", 2)
    assert majority_vote(["5", NO_ANSWER, NO_ANSWER, "5"], key) == ("5", 2)  # unread: no vote
    assert majority_vote([NO_ANSWER, "3", NO_ANSWER, NO_ANSWER], key) == ("3", 1)
    assert majority_vote([NO_ANSWER, NO_ANSWER], key) == (NO_ANSWER, 0)
    assert majority_vote([], key) == (NO_ANSWER, 0)
    assert majority_vote(["1,000", "1000", "999"], key) == ("1,000", 2)


def test_vote_settings_are_checked():
    with pytest.raises(ConfigError, match="eval.vote_systems: 'predict' cannot vote"):
        load_config("configs/demo.yaml", ["eval.vote_systems=[predict]"])
    with pytest.raises(ConfigError, match="iterate.temperatures"):
        load_config("configs/demo.yaml", ["iterate.temperatures=[]"])


def test_the_teacher_scores_a_trace_as_it_generated_it(embedded_path):
    """A forward pass over a trace gives the top-k that generating it recorded (the same
    model, float32, transformers): the data of KD on a student's traces."""
    from stages.backends.base import SamplingSettings
    from stages.backends.hf import HFBackend

    teacher = HFBackend("smollm2-135m-instruct", "float32")
    prompts = ["Question: Tom has 3 apples and gets 4 more. How many apples does he have?\n"
               "Answer:", "Question: What is 12 - 5?\nAnswer:"]
    settings = SamplingSettings(n=2, temperature=0.8, top_p=1.0, max_new_tokens=12, top_k=5,
                                seed=3, stop=[])
    made = [g for row in teacher.generate(prompts, settings) for g in row]
    scored = teacher.score([p for p in prompts for _ in range(2)],
                           [g.token_ids for g in made], 5, batch_size=3)
    for g, s in zip(made, scored):
        assert s.topk_ids.shape == g.topk_ids.shape == (len(g.token_ids), 5)
        assert (s.topk_ids == g.topk_ids).mean() > 0.95  # a near-tie may swap two ranks
        np.testing.assert_allclose(np.sort(s.topk_logprobs, 1), np.sort(g.topk_logprobs, 1),
                                   atol=1e-4)
        np.testing.assert_allclose(s.token_logprobs, g.token_logprobs, atol=1e-4)


def test_a_student_rationale_needs_no_answer_marker_a_teacher_trace_does():
    """The student learnt `explain:` targets without the teacher's answer sentence: its
    traces are read like eval reads its answers (the last number), the teacher's are not."""
    from stages.checks.keep import check_trace

    cfg = load_config("configs/demo.yaml")
    checker = answer_checker(cfg, cfg.filter.extractors)
    row = {"completion": " Sam gives away 5 stickers, so 9 - 5 = 4.", "finish_reason": "stop",
           "question": "Sam had 9 stickers. He gives away 5. How many now?",
           "token_ids": list(range(12)), "error": None}
    teacher, _ = check_trace({**row, "sampler": "teacher"}, cfg.filter, checker, gold="4",
                             gold_source="gold")
    student, added = check_trace({**row, "sampler": "student"}, cfg.filter, checker, gold="4",
                                 gold_source="gold")
    assert teacher == "no_answer_marker" and student is None
    assert added["rationale"] == row["completion"].strip() and added["pred_answer"] == "4"
    wrong, _ = check_trace({**row, "sampler": "student", "completion": " so 9 - 5 = 3."},
                           cfg.filter, checker, gold="4", gold_source="gold")
    assert wrong == "wrong_arithmetic" or wrong == "wrong_answer"


# ---------------------------------------------------------------- the loop (slow)

TINY = ["task.n_train=16", "task.n_test=2", "generate.backend=hf", "generate.dtype=float32",
        "generate.rows_per_shard=4", "generate.n_samples=1", "generate.top_k=4",
        "filter.dedup=exact", "train.dtype=float32", "train.max_steps=1", "train.batch_size=2",
        "eval.dtype=float32", "eval.n=2", "eval.max_new_tokens=24", "eval.vote_samples=2",
        "eval.vote_systems=[explain]", "iterate.samples=2", "iterate.max_new_tokens=24",
        "iterate.until_flat=false"]


def tiny(model: str) -> list[str]:
    """TINY with the tiny random model as the teacher that scores and as the student: the
    loop's bookkeeping does not depend on what a model knows (the teacher's traces are
    scripted, and so is the student's one right sample)."""
    return TINY + [f"generate.model={model}", f"train.student={model}"]


def _manifests(run: RunFolder) -> dict:
    return {name: run.stage(name).manifest() for name in
            ["generate", "filter", "train", "eval", "student-round-2", "scored-round-2"]
            if run.stage(name).manifest() is not None}


def _teacher(golds: dict, embedded_path):
    """test_rounds' scripted teacher (right on a third of its samples), writing its text in
    the embedded model's token ids, so a model of its tokenizer can score its traces and the
    student's."""
    from test_rounds import GuessingTeacher

    from pipeline.models import load_tokenizer, tokenizer_fingerprint
    from stages.backends.base import Generation

    tok = load_tokenizer(embedded_path)

    class Tokenizing(GuessingTeacher):
        def facts(self):
            return {**super().facts(), "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                    "vocab_size": len(tok)}

        def generate(self, prompts, settings):
            out = []
            for row in super().generate(prompts, settings):
                gens = []
                for g in row:
                    ids = np.array(tok(g.text, add_special_tokens=False)["input_ids"], np.int32)
                    n, k = len(ids), settings.top_k
                    gens.append(Generation(g.text, g.finish_reason, ids,
                                           np.full(n, -0.5, np.float32),
                                           np.tile(np.arange(k, dtype=np.int32), (n, 1)),
                                           np.full((n, k), -1.0, np.float32)))
                out.append(gens)
            return out

    return Tokenizing(golds)


def _one_right_sample(real, golds: dict, embedded_path):
    """The student sampler's `generate`, with the first sample of each call replaced by a
    right one-step rationale in the embedded model's token ids (the rest as sampled)."""
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(embedded_path)

    def generate(self, prompts, settings):
        out = real(self, prompts, settings)
        question = next((q for q in golds if q in prompts[0]), None)
        if question is not None and out and isinstance(out[0], list) and out[0]:
            g, gold = out[0][0], golds[question]
            g.text, g.finish_reason = f" So {gold} + 0 = {gold}.", "stop"
            g.token_ids = np.array(tok(g.text, add_special_tokens=False)["input_ids"], np.int32)
            n, k = len(g.token_ids), g.topk_ids.shape[1]
            g.token_logprobs = np.zeros(n, np.float32)
            g.topk_ids = np.full((n, k), -1, np.int32)
            g.topk_logprobs = np.full((n, k), -np.inf, np.float32)
        return out

    return generate


@pytest.mark.slow
def test_two_rounds_rerun_kill_and_a_changed_round_two(tmp_path, embedded_path, tiny_llama,
                                                       monkeypatch):
    import stages.generate.stage as generate
    import stages.iterate.stage as iterate_stages
    from pipeline.tasks import load_split
    from stages.commands.iterate import iterate
    from stages.iterate.stage import round_run

    cfg = load_config("configs/demo.yaml", tiny(tiny_llama))
    run = RunFolder(tmp_path / "loop")
    golds = {r["question"]: r["gold"] for r in load_split(cfg.task, "train").to_pylist()}
    # the teacher's traces come from a scripted teacher (right on a third of its samples);
    # everything after (its scoring, the students, eval) is the tiny model
    generate.main(cfg, run, teacher=lambda: _teacher(golds, embedded_path))
    # a one-step student rarely writes a trace the filter keeps, and not on every CPU: the
    # first sample of each of its batches is made right, so round 2 has a trace to train on
    monkeypatch.setattr(iterate_stages._EmptyTopK, "generate",
                        _one_right_sample(iterate_stages._EmptyTopK.generate, golds,
                                          embedded_path))
    done = iterate(cfg, run, 2)

    assert [r["round"] for r in done["rounds"]] == [1, 2]
    assert done["stopped"] == "2 rounds done (--rounds)"
    first, second = done["rounds"]
    assert first["student_kept"] == 0 and first["sampled_questions"] == 0
    short = first["questions"] - first["covered"]
    assert second["sampled_questions"] == short > 4  # (wanted: 1 kept trace)
    assert first["explain_votes"] is not None and first["votes"] == 2
    assert json.loads((tmp_path / "loop" / "iterate.json").read_text()) == done
    here = round_run(run, 2)
    assert here.root.endswith("loop/iterate/round-2")
    sampled = here.stage("student-round-2")
    traces = sampled.read_tables(sampled.manifest()["files"], each=logical).to_pylist()
    assert len(traces) == 2 * short
    assert all(t["prompt"].startswith("explain: ") for t in traces)
    # sample indices continue after the teacher's one
    assert {t["sample"] for t in traces} == {1, 2}
    assert all(ids == [-1] * 4 for t in traces for ids in t["topk_ids"])  # not the student's
    scored = here.stage("scored-round-2")
    rows = scored.read_tables(scored.manifest()["files"], each=logical).to_pylist()
    assert [r["token_ids"] for r in rows] == [t["token_ids"] for t in traces]
    with_tokens = [r for r in rows if r["token_ids"]]
    assert with_tokens and all(min(ids) >= 0 for r in with_tokens for ids in r["topk_ids"])
    assert all(np.all(np.diff(r["topk_logprobs"], axis=1) <= 1e-6) for r in with_tokens)
    counters = here.stage("filter").manifest()["counters"]
    assert counters["student_in"] == len(traces)
    assert counters["teacher_tokens"] == run.stage("filter").manifest()["counters"][
        "teacher_tokens"]
    kept = here.stage("filter").read_tables(
        [s["outputs"]["kept"] for s in here.stage("filter").manifest()["shards"]],
        columns=["sampler", "round"]).to_pylist()
    assert {(k["sampler"], k["round"]) for k in kept} <= {("teacher", 1), ("student", 2)}
    assert here.stage("eval").manifest()["facts"]["n"] == 2

    # a rerun does nothing again
    before = {1: _manifests(run), 2: _manifests(here)}
    assert iterate(cfg, run, 2)["rounds"] == done["rounds"]
    assert {1: _manifests(run), 2: _manifests(here)} == before
    # samples per round: a later round's count leaves round 2 as it was; round 3 would take
    # the last one
    from stages.iterate.stage import plan_round

    more = load_config("configs/demo.yaml", tiny(tiny_llama) + ["iterate.samples=[2,5]"])
    assert iterate(more, run, 2)["rounds"] == done["rounds"]
    assert {1: _manifests(run), 2: _manifests(here)} == before
    assert plan_round(more, run, 2).samples == 2 and plan_round(more, run, 3).samples == 5

    # round 2's temperature changed, and the sampling killed after its first shard: round 1
    # stays as it was; the rerun finishes round 2 from the shard it stopped at
    hotter = load_config("configs/demo.yaml", tiny(tiny_llama) + ["iterate.temperatures=[1.3]"])
    calls = []
    real = iterate_stages._EmptyTopK.generate

    def dies_on_the_second_shard(self, prompts, settings):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, prompts, settings)

    monkeypatch.setattr(iterate_stages._EmptyTopK, "generate", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        iterate(hotter, run, 2)
    monkeypatch.setattr(iterate_stages._EmptyTopK, "generate", real)
    assert _manifests(run) == before[1]
    assert here.stage("student-round-2").manifest() is None  # unfinished
    again = iterate(hotter, run, 2)
    assert _manifests(run) == before[1]
    redone = here.stage("student-round-2").manifest()
    assert redone["fingerprint"] != before[2]["student-round-2"]["fingerprint"]
    assert len(redone["shards"]) > 2 and calls == [calls[0], calls[1]]
    assert redone["shards_reused"] == 1 and redone["shards_written"] == len(redone["shards"]) - 1
    assert again["rounds"][0] == done["rounds"][0]

    # the report shows the loop: its table and its plot, as Chromium renders them
    import re

    from stages.commands.cli import main as cli
    from test_report import CHROMIUM, _browser_dom

    assert cli(["report", "--run", "loop", "--runs-dir", str(tmp_path)]) == 0
    page = (tmp_path / "loop" / "report.html").read_text()
    assert 'id="loop"' in page and "The loop" in page
    if CHROMIUM is not None:
        dom = _browser_dom(tmp_path / "loop" / "report.html")
        rendered = dict(re.findall(r'data-plot="(\w+)"[^>]*data-rendered="([^"]+)"', dom))
        width, height = map(int, rendered["loop"].split("x"))
        assert width > 200 and height > 100


@pytest.mark.slow
def test_until_flat_reads_the_validation_split_and_a_round_that_kept_nothing_new_stops(
        tmp_path, embedded_path, tiny_llama, capsys):
    """The loop judges its rounds on the validation split (cut from the training questions,
    never generated for), never on the held-out one; a round whose student wrote nothing the
    filter keeps stops before training, and says why."""
    import stages.generate.stage as generate
    from pipeline.tasks import load_split
    from stages.commands.iterate import iterate, table

    settings = tiny(tiny_llama) + ["task.validation_share=0.25", "iterate.until_flat=true",
                       "iterate.max_new_tokens=1"]  # a one-token trace: the filter drops it
    cfg = load_config("configs/demo.yaml", settings)
    valid = load_split(cfg.task, "validation").to_pylist()
    train = load_split(cfg.task, "train").to_pylist()
    assert valid and len(valid) + len(train) == 16
    assert not {r["id"] for r in valid} & {r["id"] for r in train}
    run = RunFolder(tmp_path / "loop")
    golds = {r["question"]: r["gold"] for r in train}
    generate.main(cfg, run, teacher=lambda: _teacher(golds, embedded_path))
    generated = run.stage("generate").read_tables(run.stage("generate").manifest()["files"],
                                                  columns=["id"]).column("id").to_pylist()
    assert set(generated) == {r["id"] for r in train}  # the validation questions: never asked
    done = iterate(cfg, run, 3)

    first, second = done["rounds"]
    report = run.stage("eval-validation").read_json("report.json")
    assert report["split"] == "validation" and report["n"] == len(valid)
    assert [r["system"] for r in report["results"]] == ["explain"]
    assert first["validation_explain"] == report["results"][0]["accuracy"]
    assert run.stage("eval").read_json("report.json")["n"] == 2  # the test split, as before
    assert second["kept"] == first["kept"] and second["explain"] is None
    assert done["stopped"].startswith("round 2 kept no new trace: none of the ")
    assert "stopped before training" in done["stopped"]
    from stages.iterate.stage import round_run

    assert round_run(run, 2).stage("train").manifest() is None  # no student trained
    assert "valid." in table(done["rounds"])


def test_the_validation_split_is_cut_from_the_training_questions_by_id(tmp_path):
    from pipeline.tasks import load_split

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n"
                            for i in range(200)))
    base = ["task.kind=file", f"task.train_path={path}", f"task.test_path={path}",
            "task.n_train=null"]
    none = load_config("configs/demo.yaml", base)
    assert load_split(none.task, "train").num_rows == 200
    assert load_split(none.task, "validation").num_rows == 0
    cfg = load_config("configs/demo.yaml", base + ["task.validation_share=0.2"])
    train, valid = load_split(cfg.task, "train"), load_split(cfg.task, "validation")
    assert train.num_rows + valid.num_rows == 200 and 20 <= valid.num_rows <= 60
    assert not set(train.column("id").to_pylist()) & set(valid.column("id").to_pylist())
    assert load_split(cfg.task, "test").num_rows == 200  # the held-out split is untouched
    # a larger share holds every question of a smaller one
    more = load_config("configs/demo.yaml", base + ["task.validation_share=0.4"])
    assert set(valid.column("id").to_pylist()) <= set(
        load_split(more.task, "validation").column("id").to_pylist())
    from stages.eval.stage import plan

    with pytest.raises(ValueError, match="validation split is empty: set task.validation_share"):
        plan(load_config("configs/demo.yaml", base + ["eval.split=validation"]),
             RunFolder(tmp_path / "run"))
    assert plan(load_config("configs/demo.yaml", base + [
        "task.validation_share=0.2", "eval.split=validation", "eval.systems=[base]"]),
        RunFolder(tmp_path / "run")).name == "eval-validation"


def test_eval_counts_reasoning_answers_without_a_step_and_says_when_most_have_none():
    """A student that answers explain: with a bare number (a small pool's predict: habit) is
    named, with its share of answers that hold no calculation step."""
    import pyarrow as pa

    from pipeline.prompts import PromptTemplate
    from pipeline.stage import Shard
    from stages.backends.base import Generation
    from stages.eval.stage import EvalSettings, Job, _results, eval_shard, no_step_warnings

    outputs = iter([" 10", " Sam has 9 stickers and gives away 5, so 9 - 5 = 4."])

    class Answering:  # a backend answering each prompt in turn
        def generate(self, prompts, settings):
            return [[Generation(next(outputs), "stop", np.zeros(3, np.int32),
                                np.zeros(3, np.float32), np.zeros((3, 0), np.int32),
                                np.zeros((3, 0), np.float32))] for _ in prompts]

    class Models:
        def get(self, job):
            return Answering()

    cfg = load_config("configs/demo.yaml")
    rows = pa.table({"id": ["a", "b"], "question": ["Q1?", "Sam had 9 stickers..."],
                     "gold": ["10", "4"]})
    job = Job("explain", "small", max_new_tokens=16)
    settings = EvalSettings({job.key: job}, PromptTemplate(cfg.generate.prompt_template), [],
                            8, answer_checker(cfg))
    out = eval_shard(settings, Shard.of(job.key, rows), Models())
    assert out.counters["no_steps"] == 1 and out.counters["correct"] == 2
    manifest = {"shards": [{"name": job.key, "counters": out.counters}]}
    _results(manifest)
    (result,) = manifest["results"]
    assert result["no_step_share"] == 0.5 and result["variant"] == "small"
    (line,) = no_step_warnings(manifest["results"])
    assert line.startswith("distilled small (explain:): 50% of its answers hold no calculation")
    assert no_step_warnings([{**result, "no_step_share": 0.1}]) == []


def test_the_loop_table_gives_each_rounds_accuracy_over_the_seeds():
    from stages.commands.iterate import seeds_table
    from stages.commands.seeds import seed_list, spread

    scores = {0: {"predict": 0.2, "explain": 0.7}, 3: {"predict": 0.3, "explain": 0.8}}
    rows = [{"round": 1, "predict_seeds": spread(scores, "predict"),
             "explain_seeds": spread(scores, "explain")},
            {"round": 2, "explain": None}]  # stopped before training: no line
    text = seeds_table(rows)
    assert "25.0% ± 7.1" in text and "75.0% ± 7.1" in text and "20.0/70.0  30.0/80.0" in text
    assert len(text.splitlines()) == 2
    assert seed_list("0, 3") == [0, 3]
    with pytest.raises(ConfigError, match="distinct non-negative integers"):
        seed_list("1,1")
