import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import GSM8K
from pipeline.config import TaskConfig
from pipeline.tasks import TaskError, gsm8k_gold, load_split


def test_demo_is_deterministic_with_disjoint_splits():
    cfg = TaskConfig(n_train=300, n_test=100, seed=3)
    a, b = load_split(cfg, "train"), load_split(cfg, "train")
    assert a.equals(b)
    test = load_split(cfg, "test")
    assert test.num_rows == 100 and a.num_rows == 300
    assert not set(a.column("question").to_pylist()) & set(test.column("question").to_pylist())
    # the test split does not depend on the train size
    assert load_split(TaskConfig(n_train=10, n_test=100, seed=3), "test").equals(test)
    assert load_split(TaskConfig(n_train=300, n_test=100, seed=4), "test") != test


def test_demo_answers_follow_from_the_question():
    cfg = TaskConfig(n_train=200, n_test=10, step_weights=[1], operations=["add"])
    for row in load_split(cfg, "train").to_pylist():
        nums = [int(t) for t in row["question"].replace(".", " ").replace("'s", " ").split()
                if t.isdigit()]
        assert len(nums) == 2 and int(row["gold"]) == sum(nums)


def test_demo_step_weights_select_the_number_of_steps():
    cfg = TaskConfig(n_train=100, n_test=10, step_weights=[0, 0, 1], operations=["add"])
    for q in load_split(cfg, "train").column("question").to_pylist():
        assert sum(t.isdigit() for t in q.split()) == 4


def test_gsm8k_gold_parsing():
    assert gsm8k_gold("a\nb <<2*3=6>>6\n#### 1,234") == "1234"
    with pytest.raises(TaskError):
        gsm8k_gold("no final line")


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/datasets/gsm8k is absent")
def test_gsm8k_from_shared_files():
    cfg = TaskConfig(kind="gsm8k", train_path=str(GSM8K / "train.jsonl"),
                     test_path=str(GSM8K / "test.jsonl"), n_train=None, n_test=50)
    train = load_split(cfg, "train")
    assert train.num_rows == 7473
    assert all(g and g.lstrip("-").replace(".", "").isdigit()
               for g in train.column("gold").to_pylist())
    assert load_split(cfg, "test").num_rows == 50


def test_field_mapping_composes_questions_from_jsonl_json_and_parquet(tmp_path):
    rows = [{"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": "entailment",
             "uid": "x1"},
            {"premise": "A dog runs.", "hypothesis": "A cat sits.", "label": "contradiction",
             "uid": "x2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        cfg = TaskConfig(kind="file", train_path=str(tmp_path / name),
                         question="Premise: {premise} Hypothesis: {hypothesis}",
                         answer_field="label", answer_type="string", id_field="uid")
        t = load_split(cfg, "train").to_pylist()
        assert t[0] == {"id": "x1", "question": "Premise: A man sleeps. Hypothesis: A person "
                        "rests.", "gold": "entailment"}


def test_field_mapping_errors_name_the_fields(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "1+1?", "a": 2}) + "\n")
    cfg = TaskConfig(kind="file", train_path=str(tmp_path / "d.jsonl"), question="{question}")
    with pytest.raises(TaskError, match="missing field"):
        load_split(cfg, "train")
    cfg = TaskConfig(kind="file", train_path=str(tmp_path / "d.jsonl"), question="{q}",
                     answer_field="a")
    assert load_split(cfg, "train").to_pylist()[0]["gold"] == "2"
    with pytest.raises(TaskError, match="does not exist"):
        load_split(TaskConfig(kind="file", train_path=str(tmp_path / "x.jsonl")), "train")
