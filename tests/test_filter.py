import numpy as np
import pyarrow as pa

from pipeline.config import FilterConfig
from stages.backends import Generation
from stages.filter import KEPT_SCHEMA, REJECTED_SCHEMA, count_steps, filter_shard, funnel_table
from stages.generate import traces_table


def _trace(completion, gold="8", finish="stop", n_tokens=12, error=None):
    gen = None if error else Generation(
        completion, finish, np.arange(n_tokens, dtype=np.int32),
        np.full(n_tokens, -0.5, np.float32), np.zeros((n_tokens, 3), np.int32),
        np.full((n_tokens, 3), -1.0, np.float32))
    rec = {"id": "r", "sample": 0, "question": "q", "gold": gold, "prompt": "p",
           "completion": completion, "finish_reason": "error" if error else finish,
           "error": error}
    return rec, gen


CASES = [
    (_trace(" She buys 3 more, so 5 + 3 = 8. The answer is 8."), None),
    (_trace(" 5 + 3 = 9. The answer is 9."), "wrong_answer"),
    (_trace(" She has 5 + 3 = 8 apples and then", finish="length"), "truncated"),
    (_trace(" I do not know."), "no_answer"),
    (_trace(" 5 + 3 = 8 apples"), "no_answer_marker"),
    (_trace(" The answer is 8."), "too_few_steps"),
    (_trace(" 5 + 3 = 8. The answer is 8.", n_tokens=300), "too_long"),
    (_trace("", error="RuntimeError: boom"), "generation_error"),
    (_trace(" 5 + 3 = 8. The answer is 8.", gold=None), "no_gold"),
    (_trace(" 5 + 3 = 8.0. The answer is $8.00.", gold="8"), None),
]


def test_each_check_gives_its_reason_and_the_funnel_counts_them():
    table = traces_table([c[0][0] for c in CASES], [c[0][1] for c in CASES], 3)
    out = filter_shard(table, FilterConfig(), numeric=True)
    kept, rejected = out.tables["kept"], out.tables["rejected"]
    assert kept.schema == KEPT_SCHEMA and rejected.schema == REJECTED_SCHEMA
    assert rejected.column("reason").to_pylist() == [r for _, r in CASES if r]
    assert kept.num_rows == 2
    first = kept.to_pylist()[0]
    assert first["rationale"] == "She buys 3 more, so 5 + 3 = 8."
    assert first["extractor"] == "answer_is" and first["pred_answer"] == "8"
    assert first["n_steps"] == 1 and first["n_tokens"] == 12
    assert kept.to_pylist()[1]["pred_answer"] == "8"  # canonical form of "$8.00"
    # token columns pass through untouched
    assert kept.column("topk_ids").to_pylist()[0] == [[0, 0, 0]] * 12
    c = out.counters
    assert c["traces_in"] == 10 and c["kept"] == 2 and c["dropped:wrong_answer"] == 1
    assert sum(v for k, v in c.items() if k.startswith("dropped:")) == 8
    text = funnel_table(c)
    assert "dropped: truncated" in text and "kept" in text


def test_settings_change_the_outcome():
    table = traces_table([CASES[4][0][0], CASES[5][0][0]], [CASES[4][0][1], CASES[5][0][1]], 3)
    loose = FilterConfig(require_answer_marker=False, min_steps=0)
    assert filter_shard(table, loose, numeric=True).tables["kept"].num_rows == 2


def test_count_steps_counts_calculations_not_sentences():
    assert count_steps("Anna has 5 apples. She buys 3, so 5 + 3 = 8. Then 8 - 2 = 6.") == 2
    assert count_steps("Line one 4 * 2 = 8\nline two = 10\nno maths") == 2
    assert count_steps("Nothing to compute here.") == 0


def test_empty_shard_keeps_schemas():
    table = traces_table([], [], 3)
    out = filter_shard(table, FilterConfig(), numeric=True)
    assert out.tables["kept"].num_rows == 0 and out.tables["rejected"].schema == REJECTED_SCHEMA


def test_traces_table_round_trips_token_arrays():
    rec, gen = _trace(" 5 + 3 = 8. The answer is 8.", n_tokens=4)
    gen.topk_ids = np.arange(12, dtype=np.int32).reshape(4, 3)
    table = traces_table([rec, rec], [gen, None], 3)
    row = table.to_pylist()
    assert row[0]["topk_ids"] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert row[0]["token_logprobs"] == [-0.5] * 4 and row[1]["token_ids"] == []
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32()))
