"""Generate's rounds (adaptive sampling, hints) with a scripted teacher at the backend boundary,
and the filter reading them: which questions are sampled again, resume, a raised budget, the
seeds, the hinted traces and their leak check, question coverage."""

import hashlib
import re

import numpy as np
import pytest

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
from pipeline.config import ConfigError, load_config
from pipeline.run_folder import RunFolder
from pipeline.schema import logical
from pipeline.tasks import load_split
from stages.backends.base import Generation
from stages.checks.answers import answer_checker
from stages.checks.traces import CHECKS, Trace

BASE = ["task.n_train=24", "generate.rows_per_shard=8", "generate.n_samples=2",
        "generate.top_k=4", "filter.dedup=exact"]


class GuessingTeacher:
    """Right on about a third of its samples (decided by the request's seed and the sample),
    always right when the prompt holds the answer; every trace's text is its own."""

    name = "guessing"

    def __init__(self, golds: dict[str, str]):
        self.golds, self.requests = golds, []
        self.die_at = None  # a kill (KeyboardInterrupt) at this request
        self.temperatures = []  # of each call

    def facts(self):
        return {"backend": "guessing", "teacher": "guessing", "vocab_size": 10,
                "tokenizer_fingerprint": "0" * 16, "logprob_source": "raw_logits"}

    def generate(self, prompts, settings):
        self.temperatures.append(settings.temperature)
        out = []
        for i, prompt in enumerate(prompts):
            question = prompt.rsplit("Question: ", 1)[1].split("\n")[0]
            hint = re.search(r" \(The answer is (\S+)\.\)$", question)
            question = question[:hint.start()] if hint else question
            seed = settings.seed_of(i)
            if self.die_at is not None and len(self.requests) >= self.die_at:
                raise KeyboardInterrupt
            self.requests.append((question, seed, bool(hint)))
            gold = int(self.golds[question])
            gens = []
            for j in range(settings.n):
                h = int(hashlib.sha256(f"{seed}:{j}".encode()).hexdigest(), 16)
                v = gold if hint or h % 3 == 0 else gold + 1
                text = f" Case {h % 10**6}: so {v} + 0 = {v}. The answer is {v}."
                gens.append(Generation(text, "stop", np.arange(5, dtype=np.int32),
                                       np.full(5, -0.1, np.float32),
                                       np.tile(np.arange(settings.top_k, dtype=np.int32), (5, 1)),
                                       np.full((5, settings.top_k), -1.0, np.float32)))
            out.append(gens)
        return out


def setup(tmp_path, extra=()):
    cfg = load_config("configs/demo.yaml", BASE + list(extra))
    rows = load_split(cfg.task, "train").to_pylist()
    return cfg, GuessingTeacher({r["question"]: r["gold"] for r in rows})


def gen(cfg, tmp_path, teacher):
    return generate.main(cfg, tmp_path, teacher=lambda: teacher)


def all_traces(tmp_path):
    run = RunFolder(tmp_path)
    out = []
    names = run.stage_names("generate-round") + run.stage_names("generate-hints")
    for name in ["generate"] + names:
        m = run.stage(name).manifest()
        if m:
            out += [dict(r, folder=name) for r in
                    run.stage(name).read_tables(m["files"], each=logical).to_pylist()]
    return out


def test_rounds_sample_only_the_short_questions_and_the_first_round_is_unchanged(tmp_path):
    cfg, teacher = setup(tmp_path, ["generate.max_samples=6", "generate.round_samples=2",
                                    "generate.wanted_per_question=2"])
    plain, plain_teacher = setup(tmp_path)
    first = gen(plain, tmp_path / "plain", plain_teacher)
    manifest = gen(cfg, tmp_path / "adaptive", teacher)
    # round 1: the fingerprint and the files of the stage without rounds
    assert manifest["fingerprint"] == first["fingerprint"]
    assert [f["sha256"] for f in manifest["files"]] == [f["sha256"] for f in first["files"]]
    rows = all_traces(tmp_path / "adaptive")
    by_q: dict = {}
    for r in rows:
        by_q.setdefault(r["id"], []).append(r)
    folders = {r["folder"] for r in rows}
    assert folders >= {"generate", "generate-round-2"} and len(rows) > 48
    checker = answer_checker(cfg)
    for q, traces in by_q.items():
        samples = sorted(r["sample"] for r in traces)
        assert samples == list(range(len(samples)))  # indices continue across rounds
        assert len(samples) in (2, 4, 6)
        right = [r for r in traces if checker.match(r["completion"].split()[-1].rstrip("."),
                                                     r["gold"])]
        # a question got another round only while it had fewer than 2 right traces
        for n in (2, 4):
            if len(samples) > n:
                assert sum(1 for r in right if r["sample"] < n) < 2
            elif len(samples) == n:
                assert n == 6 or sum(1 for r in right if r["sample"] < n) >= 2
    # the filter reads every round, marks where each trace came from and counts coverage
    f = filter_stage.main(cfg, tmp_path / "adaptive")
    kept = RunFolder(tmp_path / "adaptive").stage("filter").read_tables(
        [s["outputs"]["kept"] for s in f["shards"]]).to_pylist()
    assert {r["round"] for r in kept} >= {1, 2} and not any(r["hinted"] for r in kept)
    c = f["counters"]
    assert c["questions"] == 24 and c["labelled_questions"] == 24
    assert c["covered"] == len({r["id"] for r in kept})
    assert c["teacher_tokens"] == 5 * len(rows)
    assert f["facts"]["rounds"][0]["folder"] == "generate-round-2"
    assert "covered" in filter_stage.funnel_table(c)


def test_a_run_killed_between_rounds_resumes_without_sending_a_request_again(tmp_path):
    settings = ["generate.max_samples=6"]
    cfg, clean = setup(tmp_path, settings)
    gen(cfg, tmp_path / "clean", clean)
    rounds = [RunFolder(tmp_path / "clean").stage(n).manifest()["counters"]["rows"]
              for n in ("generate", "generate-round-2", "generate-round-3")]
    assert all(rounds)
    # killed as round 3 starts (its first request)
    _, teacher = setup(tmp_path, settings)
    teacher.die_at = rounds[0] + rounds[1]
    with pytest.raises(KeyboardInterrupt):
        gen(cfg, tmp_path / "killed", teacher)
    assert RunFolder(tmp_path / "killed").stage("generate-round-2").manifest() is not None
    sent = list(teacher.requests)
    assert len(sent) == rounds[0] + rounds[1]
    _, again = setup(tmp_path, settings)
    gen(cfg, tmp_path / "killed", again)
    assert not set(again.requests) & set(sent)  # nothing asked twice
    assert sorted(sent + again.requests) == sorted(clean.requests)
    same = [{k: v for k, v in r.items() if k != "folder"} for r in all_traces(tmp_path / "clean")]
    assert [{k: v for k, v in r.items() if k != "folder"}
            for r in all_traces(tmp_path / "killed")] == same
    # a rerun does nothing
    again.requests = []
    gen(cfg, tmp_path / "killed", again)
    assert again.requests == []


def test_a_raised_budget_samples_only_the_new_traces(tmp_path):
    cfg, teacher = setup(tmp_path, ["generate.max_samples=4"])
    gen(cfg, tmp_path, teacher)
    before = set(teacher.requests)
    seen = {(r["id"], r["sample"]): r["completion"] for r in all_traces(tmp_path)}
    raised, _ = setup(tmp_path, ["generate.max_samples=8"])
    teacher.requests = []
    gen(raised, tmp_path, teacher)
    assert teacher.requests and not set(teacher.requests) & before
    after = {(r["id"], r["sample"]): r["completion"] for r in all_traces(tmp_path)}
    assert all(after[key] == text for key, text in seen.items())  # nothing remade
    assert max(s for _, s in after) >= 4 and max(s for _, s in seen) == 3
    # the requests of the new rounds are those a run with the raised budget from the start sends
    fresh, fresh_teacher = setup(tmp_path, ["generate.max_samples=8"])
    gen(fresh, tmp_path / "fresh", fresh_teacher)
    assert set(fresh_teacher.requests) == before | set(teacher.requests)


def test_hints_ask_the_uncovered_questions_with_their_answer(tmp_path):
    cfg, teacher = setup(tmp_path, ["generate.hint_template=data/prompts/add_subtract_hint.txt",
                                    "generate.hint_samples=1"])
    gen(cfg, tmp_path, teacher)
    hinted = [r for r in all_traces(tmp_path) if r["folder"] == "generate-hints"]
    assert hinted and all("(The answer is " in r["prompt"] for r in hinted)
    assert all("(The answer is" not in r["question"] for r in hinted)
    assert all(r["sample"] == 2 for r in hinted)
    f = filter_stage.main(cfg, tmp_path)
    kept = RunFolder(tmp_path).stage("filter").read_tables(
        [s["outputs"]["kept"] for s in f["shards"]]).to_pylist()
    assert {r["id"] for r in kept if r["hinted"]} == {r["id"] for r in hinted}
    assert f["counters"]["covered"] == 24 and f["counters"]["hinted_kept"] == len(hinted)


def test_each_round_samples_at_its_own_temperature(tmp_path):
    cfg, teacher = setup(tmp_path, ["generate.max_samples=8", "generate.wanted_per_question=4",
                                    "generate.round_temperatures=[1.1,0.9]",
                                    "generate.rows_per_shard=24"])
    gen(cfg, tmp_path, teacher)
    run = RunFolder(tmp_path)
    assert [run.stage(n).manifest()["facts"]["sampling"]["temperature"]
            for n in ("generate-round-2", "generate-round-3", "generate-round-4")] == \
        [1.1, 0.9, 0.9]
    assert teacher.temperatures == [0.4, 1.1, 0.9, 0.9]  # one call per round (one shard)
    cooler = load_config("configs/demo.yaml", BASE + ["generate.max_samples=8",
                                                      "generate.wanted_per_question=4",
                                                      "generate.round_temperatures=[1.1,0.5]",
                                                      "generate.rows_per_shard=24"])
    teacher.temperatures = []
    gen(cooler, tmp_path, teacher)  # round 2 stays; rounds 3 and 4 are redone
    assert teacher.temperatures[0] == 0.5 and 1.1 not in teacher.temperatures


def test_the_filter_refuses_rounds_that_are_not_finished(tmp_path):
    cfg, teacher = setup(tmp_path)
    gen(cfg, tmp_path, teacher)
    more = load_config("configs/demo.yaml", BASE + ["generate.max_samples=4"])
    with pytest.raises(FileNotFoundError, match="has not finished its rounds: round 2"):
        filter_stage.main(more, tmp_path)


def test_a_changed_filter_setting_reads_the_rounds_made_without_the_teacher(tmp_path, capsys):
    """Rounds planned under other filter settings are read as they are (the log says so):
    re-filtering never needs the teacher."""
    cfg, teacher = setup(tmp_path, ["generate.max_samples=6"])
    gen(cfg, tmp_path, teacher)
    first = filter_stage.main(cfg, tmp_path)
    stricter = load_config("configs/demo.yaml", BASE + ["generate.max_samples=6",
                                                        "filter.max_words=8"])
    capsys.readouterr()
    again = filter_stage.main(stricter, tmp_path)
    assert "was made for the questions other settings found short" in capsys.readouterr().err
    assert again["counters"]["traces_in"] == first["counters"]["traces_in"]
    assert again["counters"]["kept"] < first["counters"]["kept"]


def test_round_settings_are_checked():
    with pytest.raises(ConfigError, match="whole number of rounds"):
        load_config("configs/demo.yaml", ["generate.n_samples=2", "generate.max_samples=5",
                                          "generate.round_samples=2"])
    with pytest.raises(ConfigError, match="below generate.n_samples"):
        load_config("configs/demo.yaml", ["generate.n_samples=4", "generate.max_samples=2"])
    with pytest.raises(ConfigError, match="no {answer} placeholder"):
        load_config("configs/demo.yaml",
                    ["generate.hint_template=data/prompts/add_subtract_cot.txt"])
    from stages.generate.rounds import check
    with pytest.raises(ConfigError, match="above filter.max_per_question"):
        check(load_config("configs/demo.yaml", ["generate.max_samples=4",
                                                "generate.wanted_per_question=3",
                                                "filter.max_per_question=2"]))


def leak(completion: str, question="Anna has 5 apples. She buys 3 more. How many now?",
         gold="8", hinted=True):
    cfg = load_config("configs/demo.yaml").filter
    checker = answer_checker(load_config("configs/demo.yaml"))
    found = checker.extract(completion, question)
    check = CHECKS.get("hint_leak")
    return check(Trace({"completion": completion, "question": question, "hinted": hinted},
                       found, True, completion, gold, checker, {}), cfg)


def test_the_leak_check_on_hand_written_hinted_traces():
    assert leak(" Anna has 5 apples and buys 3, so 5 + 3 = 8. The answer is 8.") is None
    assert "before any step" in leak(" The answer is 8. She has 5 and buys 3, so 5 + 3 = 8.")
    assert "before any step" in leak(" We need to reach 8. 5 + 3 = 8. The answer is 8.")
    assert "given the answer" in leak(" The hint says 8, and 5 + 3 = 8. The answer is 8.")
    assert "given the answer" in leak(" We are told the answer is 8: 5 + 3 = 8. The answer is 8.")
    # the answer copied from the hint after steps that do not reach it (seen on the harder
    # config's hinted round), or with no step at all
    assert "only asserted" in leak(" She has 5, so 5 * 2 = 10, minus 1 is 9. The answer is 8.")
    assert "only asserted" in leak(" Anna buys apples. The answer is 8.")
    # not hinted: never a leak; an answer that is one of the question's numbers tells nothing
    assert leak(" The answer is 8. 5 + 3 = 8.", hinted=False) is None
    assert leak(" She has 5, gives 0: 5 - 0 = 5. The answer is 5.", gold="5") is None


@pytest.mark.slow
def test_the_student_trains_on_every_round_with_gold_predict_examples(tmp_path, tiny_llama,
                                                                      capsys):
    """Train reads the kept traces of every round (hinted ones too) and, with
    train.predict_on=labelled, makes predict: examples of every labelled question."""
    import stages.train.stage as train

    cfg, teacher = setup(tmp_path, ["generate.max_samples=4",
                                    "generate.hint_template=data/prompts/add_subtract_hint.txt",
                                    "train.predict_on=labelled", "train.dtype=float32",
                                    f"train.student={tiny_llama}",
                                    "train.max_steps=1", "train.batch_size=2"])
    gen(cfg, tmp_path, teacher)
    f = filter_stage.main(cfg, tmp_path)
    capsys.readouterr()
    m = train.main(cfg, tmp_path)
    err = capsys.readouterr().err
    assert m["counters"]["steps"] == 1 and m["counters"]["traces"] == f["counters"]["kept"]
    assert "predict: examples from 24 labelled questions" in err
    assert f"{f['counters']['hinted_kept']} of the kept traces are hinted" in err


def test_the_coverage_ladder_copies_the_rounds_and_tabulates_each_rung(tmp_path):
    from stages.commands.coverage import RUNGS, copy_generated, rung_row, table

    cfg, teacher = setup(tmp_path, ["generate.max_samples=4",
                                    "generate.hint_template=data/prompts/add_subtract_hint.txt"])
    gen(cfg, tmp_path / "main", teacher)
    rows = []
    for rung, (suffix, extra) in list(RUNGS.items())[:3]:
        target = RunFolder(tmp_path / suffix)
        copy_generated(RunFolder(tmp_path / "main"), target)
        copy_generated(RunFolder(tmp_path / "main"), target)  # a second call copies nothing
        rung_cfg = load_config("configs/demo.yaml", BASE + ["generate.max_samples=4",
                                                            "generate.hint_template=data/"
                                                            "prompts/add_subtract_hint.txt"]
                               + extra)
        filter_stage.main(rung_cfg, target.root)
        scores = {0: {"predict": 0.5, "explain": 0.75}, 1: {"predict": 0.7, "explain": 0.75}}
        rows.append(rung_row(rung, target, scores, {"accuracy": 0.8, "votes": 4}))
    fixed, adaptive, hints = rows
    assert fixed["teacher_tokens"] < adaptive["teacher_tokens"] < hints["teacher_tokens"]
    assert fixed["covered"] <= adaptive["covered"] <= hints["covered"] == 24
    assert fixed["hinted_kept"] == adaptive["hinted_kept"] == 0 < hints["hinted_kept"]
    assert hints["tokens_per_covered"] == round(hints["teacher_tokens"] / 24, 1)
    assert abs(hints["predict"]["mean"] - 0.6) < 1e-9 and hints["predict"]["sd"] > 0.14
    text = table(rows, [{"system": "teacher", "accuracy": 0.4}], 1)
    assert "adaptive+hints" in text and "60.0% ± 14.1" in text and "75.0% ± 0.0" in text
    assert "maj@4" in text and "80.0%" in text and "over 2 training seeds" in text
    assert "teacher (few-shot CoT): 40.0%" in text
    untrained = rung_row("fixed", RunFolder(tmp_path / "fixed"), None)
    assert untrained["predict"] is None and table([untrained], [], 1).rstrip().endswith("-")


def test_the_ladder_refuses_unknown_rungs_and_a_loop_without_the_gold_rung(tmp_path, capsys):
    from stages.commands.coverage import main

    common = ["--config", "configs/harder.yaml", "--runs-dir", str(tmp_path), "--run", "x"]
    assert main(common + ["--rungs", "fixed,best"]) != 0
    assert "--rungs 'fixed,best': name rungs by their folder suffix" in capsys.readouterr().err
    assert main(common + ["--rungs", "fixed", "--loop-rounds", "1"]) != 0
    assert "add gold to --rungs" in capsys.readouterr().err
    assert not (tmp_path / "x" / "generate").exists()  # refused before the teacher ran


def test_a_job_array_does_one_round_per_pass(tmp_path, capsys):
    """Workers and --finalize of round 1, then the same commands again for round 2 and so
    on; the traces are those of one process doing every round."""
    from pipeline.executors.array import ArrayRole

    settings = ["generate.max_samples=6"]
    cfg, clean = setup(tmp_path, settings)
    gen(cfg, tmp_path / "one", clean)
    _, teacher = setup(tmp_path, settings)
    passes = 0
    while True:
        for i in range(2):
            assert generate.main(cfg, tmp_path / "array", teacher=lambda: teacher,
                                 role=ArrayRole(num_workers=2, worker_index=i)) is None
        capsys.readouterr()
        generate.main(cfg, tmp_path / "array", teacher=lambda: teacher,
                      role=ArrayRole(finalize=True))
        passes += 1
        said = capsys.readouterr().err
        assert "finalized; " in said
        if "no more rounds" in said:
            break
        assert "next: run the array again" in said and passes < 5
    assert passes == 3 and sorted(teacher.requests) == sorted(clean.requests)
    same = [{k: v for k, v in r.items() if k != "folder"} for r in all_traces(tmp_path / "one")]
    assert [{k: v for k, v in r.items() if k != "folder"}
            for r in all_traces(tmp_path / "array")] == same


def test_an_api_teacher_pays_each_round_once_and_its_cache_answers_a_lost_round(tmp_path):
    """On an OpenAI-compatible teacher (a local fake server whose answers are nearly all
    wrong, so nearly every question stays short): each round sends one request per question,
    with its own seed; a raised budget sends only the new round's; a lost round folder is made
    again from the request cache without a request."""
    import shutil

    from fake_openai import FakeServer

    with FakeServer() as server:
        def cfg(max_samples):
            return load_config("configs/demo.yaml", [
                "task.n_train=12", "generate.rows_per_shard=4", "generate.n_samples=2",
                "generate.backend=openai", "generate.server_token_ids=true",
                "generate.model=fake", f"generate.base_url={server.base_url}",
                "generate.request_timeout=30", "generate.max_retries=1", "generate.top_k=4",
                f"generate.max_samples={max_samples}"])

        def sent():
            return sum(server.attempts.values())

        generate.main(cfg(4), tmp_path)
        run = RunFolder(tmp_path)

        def asked(name):
            return run.stage(name).manifest()["counters"]["rows"]

        assert sent() == 12 + asked("generate-round-2")  # one request per question and round
        samples = {r["sample"] for r in run.stage("generate-round-2").read_tables(
            run.stage("generate-round-2").manifest()["files"]).to_pylist()}
        assert samples == {2, 3}
        before = sent()
        generate.main(cfg(6), tmp_path)
        assert sent() == before + asked("generate-round-3") > before  # round 3 only
        before = sent()
        shutil.rmtree(tmp_path / "generate-round-3")
        generate.main(cfg(6), tmp_path)
        assert sent() == before  # remade from the cache
        assert run.stage("generate-round-3").manifest()["counters"]["traces"] == \
            2 * asked("generate-round-3")
