"""`distill import`: traces made elsewhere become a run's generate stage, in the three input
kinds; filter, train (a seq2seq student included) and eval run on them; KD refuses."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.run_folder import RunFolder
from stages.commands.cli import main as cli, run_stages
from stages.commands.import_traces import import_traces, parse_dss_output

QUESTIONS = [(f"Tom has {a} apples. He gets {b} more. How many apples does he have now?", a, b)
             for a, b in [(5, 3), (7, 2), (4, 4), (9, 1), (6, 5), (3, 8)]]


def _table_rows():
    return [{"question": q, "rationale": f"Tom starts with {a} apples and gets {b} more, so "
             f"{a} + {b} = {a + b}.", "answer": str(a + b)} for q, a, b in QUESTIONS]


def _kept_and_rejected(run_dir):
    folder = RunFolder(run_dir).stage("filter")
    manifest = folder.manifest()
    kept = folder.read_tables([s["outputs"]["kept"] for s in manifest["shards"]]).to_pylist()
    rejected = folder.read_tables([s["outputs"]["rejected"]
                                   for s in manifest["shards"]]).to_pylist()
    return kept, rejected


def _cfg(*extra):
    return load_config("configs/demo.yaml", ["generate.rows_per_shard=4", *extra])


def test_a_jsonl_of_question_answer_rationale(tmp_path, embedded_path):
    path = tmp_path / "traces.jsonl"
    rows = _table_rows()
    rows[-1]["rationale"] = "3 + 8 = 12."  # wrong arithmetic: the filter must see it
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run = RunFolder(tmp_path / "run")
    manifest = import_traces(_cfg(), run, "table", [str(path)])
    assert manifest["counters"]["traces"] == 6 and len(manifest["shards"]) == 2
    assert manifest["facts"]["k"] == 0 and not manifest["facts"]["usable_for_kd"]
    run_stages(["filter"], _cfg(), run)
    kept, rejected = _kept_and_rejected(run.url)
    assert len(kept) == 5 and [r["reason"] for r in rejected] == ["wrong_arithmetic"]
    assert kept[0]["rationale"].endswith(f"{5} + {3} = {8}.") and kept[0]["gold"] == "8"
    assert kept[0]["n_tokens"] > 10  # tokenised by the student's tokenizer
    # the same files again: up to date; a changed file: imported again
    assert import_traces(_cfg(), run, "table", [str(path)])["fingerprint"] == \
        manifest["fingerprint"]
    # KD needs a teacher's log-probabilities: a clear refusal, no traceback
    code = cli(["train", "--run", "run", "--runs-dir", str(tmp_path), "train.kd_lam=0.5"])
    assert code == 1


def test_kd_refusal_names_the_import(tmp_path, embedded_path, capsys):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(_table_rows()), path)
    assert cli(["import", "--run", "r", "--runs-dir", str(tmp_path), "--kind", "table",
                "--from", str(path)]) == 0
    assert cli(["filter", "--run", "r", "--runs-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    for setting in ("train.kd_lam=0.5", "train.answer_kd_lam=0.5",
                    "train.rationale_loss=cosine"):
        assert cli(["train", "--run", "r", "--runs-dir", str(tmp_path), setting]) == 1
        err = capsys.readouterr().err
        assert "imported" in err and "carry none" in err and setting.split("=")[0] in err
        assert "Traceback" not in err
    # a teacher must not silently replace the imported traces
    assert cli(["generate", "--run", "r", "--runs-dir", str(tmp_path)]) == 1
    assert "were imported" in capsys.readouterr().err


def test_the_dss_repositorys_llm_outputs(tmp_path, embedded_path):
    """The DSS repository's files: `llm/train_CoT_<i>.json` (a list of raw outputs, next
    few-shot question included) and the dataset's JSON lines (`input`, `label`)."""
    outputs = [f"Tom starts with {a} apples and gets {b} more, so {a} + {b} = {a + b}. So the "
               f"answer is {a + b}.\n\nQ: Ann has 2 pens ..." for _, a, b in QUESTIONS]
    outputs[1] = "Tom has 7 apples and 2 more, 7 + 2 = 10. So the answer is 10."  # wrong
    outputs[2] = "I am not sure about this one.\n\nQ: next"  # no answer at all
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "train_CoT_0.json").write_text(json.dumps(outputs[:3]))
    (tmp_path / "llm" / "train_CoT_1.json").write_text(json.dumps(outputs[3:]))
    (tmp_path / "svamp_train.json").write_text("\n".join(
        json.dumps({"input": q, "label": float(a + b)}) for q, a, b in QUESTIONS))
    assert parse_dss_output(outputs[0]) == (
        "Tom starts with 5 apples and gets 3 more, so 5 + 3 = 8.", "8")
    assert parse_dss_output({"rationale": "r", "label": "x"}) == ("r", "x")
    run = RunFolder(tmp_path / "run")
    import_traces(_cfg(), run, "dss", [str(tmp_path / "llm" / f"train_CoT_{i}.json")
                                       for i in (0, 1)], str(tmp_path / "svamp_train.json"))
    run_stages(["filter"], _cfg(), run)
    kept, rejected = _kept_and_rejected(run.url)
    assert len(kept) == 4
    assert sorted(r["reason"] for r in rejected) == ["no_answer", "wrong_answer"]
    with pytest.raises(ValueError, match="3 outputs and .* 6 examples"):
        import_traces(_cfg(), RunFolder(tmp_path / "r2"), "dss",
                      [str(tmp_path / "llm" / "train_CoT_0.json")],
                      str(tmp_path / "svamp_train.json"))


def test_hugging_face_dataset_folders_from_distilabel_and_curator(tmp_path, embedded_path):
    from datasets import Dataset

    # distilabel's text generation: `instruction` in, `generation` out (the whole reasoning)
    distilabel = Dataset.from_list([
        {"instruction": q, "generation": f"{a} + {b} = {a + b}. The answer is {a + b}.",
         "model_name": "teacher-70b", "distilabel_metadata": {"raw_output": "..."}}
        for q, a, b in QUESTIONS])
    distilabel.save_to_disk(str(tmp_path / "distilabel"))
    run = RunFolder(tmp_path / "a")
    import_traces(_cfg(), run, "hf", [str(tmp_path / "distilabel")])
    run_stages(["filter"], _cfg(), run)  # no gold, one trace per question: nothing to check
    kept, rejected = _kept_and_rejected(run.url)
    assert not kept and {r["reason"] for r in rejected} == {"no_consensus"}
    run_stages(["filter"], _cfg("filter.min_votes=1"), run)
    kept, _ = _kept_and_rejected(run.url)
    assert len(kept) == 6 and kept[0]["rationale"] == "5 + 3 = 8."
    assert kept[0]["gold_source"] == "majority"  # the trace's own answer

    # curator: the user's own column names, here named with --map
    (tmp_path / "curator" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"problem_text": q, "steps": f"{a} + {b} = {a + b}.", "final": str(a + b)}
        for q, a, b in QUESTIONS]), tmp_path / "curator" / "data" / "train-00000.parquet")
    assert cli(["import", "--run", "b", "--runs-dir", str(tmp_path), "--kind", "hf", "--from",
                str(tmp_path / "curator"), "--map", "question=problem_text",
                "rationale=steps", "answer=final"]) == 0
    run_stages(["filter"], _cfg(), RunFolder(tmp_path / "b"))
    kept, _ = _kept_and_rejected(tmp_path / "b")
    assert len(kept) == 6 and kept[0]["pred_answer"] == "8"
    # without the mapping the question column is not found: one clear line
    assert cli(["import", "--run", "c", "--runs-dir", str(tmp_path), "--kind", "hf", "--from",
                str(tmp_path / "curator")]) == 1
