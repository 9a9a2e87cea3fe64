import itertools
import json

import numpy as np
import pyarrow as pa

from stages.checks.settings import FilterConfig
from pipeline.schema import (KEPT_SCHEMA, REJECTED_SCHEMA, TRACE_SCHEMA_V2, kept_schema, logical,
                             rejected_schema, traces_table)
from pipeline.stage import Shard
from stages.backends.base import Generation
from stages.checks.answers import AnswerChecker
from stages.checks.traces import count_steps, repeat_share
from stages.filter.stage import FilterSettings, filter_shard, funnel_table

_ids = itertools.count()
NUMERIC = AnswerChecker("numeric")


def _trace(completion, gold="8", finish="stop", n_tokens=12, error=None, row=None, sample=0,
           question="q"):
    gen = None if error else Generation(
        completion, finish, np.arange(n_tokens, dtype=np.int32),
        np.full(n_tokens, -0.5, np.float32), np.zeros((n_tokens, 3), np.int32),
        np.full((n_tokens, 3), -1.0, np.float32))
    rec = {"id": row or f"r{next(_ids)}", "sample": sample, "question": question, "gold": gold,
           "prompt": "p", "completion": completion,
           "finish_reason": "error" if error else finish, "error": error}
    return rec, gen


def _filter(traces, cfg=None, checker=NUMERIC):
    table = traces_table([t[0] for t in traces], [t[1] for t in traces], 3)
    return filter_shard(FilterSettings(cfg or FilterConfig(), checker), Shard.of("00000", table))


CASES = [
    (_trace(" She buys 3 more, so 5 + 3 = 8. The answer is 8."), None),
    (_trace(" 5 + 3 = 9. The answer is 9."), "wrong_answer"),
    (_trace(" She has 5 + 3 = 8 apples and then", finish="length"), "truncated"),
    (_trace(" I do not know."), "no_answer"),
    (_trace(" 5 + 3 = 8 apples"), "no_answer_marker"),
    (_trace(" The answer is 8."), "too_few_steps"),
    (_trace(" 5 + 3 = 8. The answer is 8.", n_tokens=300), "too_long"),
    (_trace("", error="RuntimeError: boom"), "generation_error"),
    (_trace(" 5 + 3 = 8. The answer is 8.", gold=None), "no_consensus"),
    (_trace(" 5 + 3 = 8.0. The answer is $8.00.", gold="8"), None),
    (_trace(" She buys 3, so 5 + 3 = 9 and 9 - 1 = 8. The answer is 8."), "wrong_arithmetic"),
    (_trace(" " + "and then she counts again " * 12 + "5 + 3 = 8. The answer is 8.",
            n_tokens=100), "repetitive"),
    (_trace(" " + "word " * 1200 + "5 + 3 = 8. The answer is 8.", n_tokens=100), "too_long"),
]


def test_each_check_gives_its_reason_and_the_funnel_counts_them():
    out = _filter([c[0] for c in CASES], FilterConfig(max_tokens=256))
    kept, rejected = out.tables["kept"], out.tables["rejected"]
    assert kept.schema == kept_schema(TRACE_SCHEMA_V2)
    assert rejected.schema == rejected_schema(TRACE_SCHEMA_V2)
    assert rejected.column("reason").to_pylist() == [r for _, r in CASES if r]
    assert kept.num_rows == 2
    first = kept.to_pylist()[0]
    assert first["rationale"] == "She buys 3 more, so 5 + 3 = 8."
    assert first["extractor"] == "answer_is" and first["pred_answer"] == "8"
    assert first["n_steps"] == 1 and first["n_tokens"] == 12
    assert kept.to_pylist()[1]["pred_answer"] == "8"  # canonical form of "$8.00"
    # token columns pass through untouched
    assert logical(kept).column("topk_ids").to_pylist()[0] == [[0, 0, 0]] * 12
    c = out.counters
    assert c["traces_in"] == len(CASES) and c["kept"] == 2 and c["dropped:wrong_answer"] == 1
    assert sum(v for k, v in c.items() if k.startswith("dropped:")) == len(CASES) - 2
    detail = dict(zip(rejected.column("reason").to_pylist(), rejected.column("detail").to_pylist()))
    assert detail["wrong_arithmetic"] == "5 + 3 = 9 (it is 8)"
    assert detail["wrong_answer"] == "gold 8"
    text = funnel_table(c)
    assert "dropped: truncated" in text and "kept" in text


def test_settings_change_the_outcome():
    loose = FilterConfig(require_answer_marker=False, min_steps=0)
    assert _filter([CASES[4][0], CASES[5][0]], loose).tables["kept"].num_rows == 2
    wrong_sums = [CASES[-3][0]]
    assert _filter(wrong_sums).tables["kept"].num_rows == 0
    assert _filter(wrong_sums, FilterConfig(check_arithmetic=False)).tables["kept"].num_rows == 1


def test_count_steps_counts_calculations_and_numbered_steps_not_sentences():
    assert count_steps("Anna has 5 apples. She buys 3, so 5 + 3 = 8. Then 8 - 2 = 6.") == 2
    assert count_steps("Line one 4 * 2 = 8\nline two = 10\nno maths") == 2
    assert count_steps("Nothing to compute here.") == 0
    assert count_steps("Step 1: read the premise.\nStep 2: compare it with the hypothesis.") == 2
    assert count_steps("1. The man is outdoors.\n2) A dog is not mentioned.\n- so: neutral") == 3
    assert count_steps("Natalia sold <<48/2=24>>24 clips in May.") == 1


def test_repetition_share_tells_a_loop_from_a_normal_trace():
    normal = ("Natalia sold 48 / 2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips "
              "altogether in April and May.").lower().split()
    loop = ("so she has 8 apples and " * 10).split()
    assert repeat_share(normal, 4) == 0.0
    assert repeat_share(loop, 4) > 0.8
    assert repeat_share(["a", "b"], 4) == 0.0


def test_duplicates_of_a_question_keep_one_and_the_cap_keeps_the_first():
    same = " She buys 3 more, so 5 + 3 = 8. The answer is 8."
    near = " She buys 3 more, so 5 + 3 = 8!  The answer is 8."  # only punctuation differs
    other = " Anna has 5 apples. She gets 3 more: 5 + 3 = 8. The answer is 8."
    third = " 5 apples plus 3 apples: 5 + 3 = 8 in all. The answer is 8."
    traces = [_trace(t, row="q1", sample=i) for i, t in enumerate([same, near, other, third])]
    out = _filter(traces)
    reasons = out.tables["rejected"].column("reason").to_pylist()
    assert out.tables["kept"].column("sample").to_pylist() == [0, 2, 3] and reasons == ["duplicate"]
    assert out.tables["rejected"].column("detail").to_pylist() == ["duplicate of sample 0 of this question"]
    capped = _filter(traces, FilterConfig(max_per_question=2))
    assert capped.tables["kept"].column("sample").to_pylist() == [0, 2]
    assert sorted(capped.tables["rejected"].column("reason").to_pylist()) == ["duplicate",
                                                                             "over_cap"]
    assert _filter(traces, FilterConfig(dedup="off")).tables["kept"].num_rows == 4
    # another question with the same text is not a duplicate
    assert _filter([_trace(same), _trace(same)]).tables["kept"].num_rows == 2


def test_near_duplicates_by_word_sequence_similarity():
    a = " Tom has 12 marbles and gives away 4, so 12 - 4 = 8 marbles are left in his bag now. The answer is 8."
    b = " Tom has 12 marbles and gives away 4, so 12 - 4 = 8 marbles are left in the bag now. The answer is 8."
    traces = [_trace(a, row="q", sample=0), _trace(b, row="q", sample=1)]
    assert _filter(traces).tables["kept"].num_rows == 1
    assert _filter(traces, FilterConfig(dedup="exact")).tables["kept"].num_rows == 2


def test_unlabeled_rows_take_the_majority_answer_when_enough_samples_agree():
    votes = [" 5 + 3 = 8. The answer is 8.", " 5 + 3 = 8, so the answer: 8. The answer is 8.",
             " 5 + 4 = 9. The answer is 9.", " 2 + 3 = 5. The answer is 5."]
    traces = [_trace(t, gold=None, row="u", sample=i) for i, t in enumerate(votes)]
    out = _filter(traces)
    kept = out.tables["kept"].to_pylist()
    assert [r["sample"] for r in kept] == [0, 1]
    assert {r["gold_source"] for r in kept} == {"majority"} and kept[0]["agreement"] == 0.5
    assert out.tables["rejected"].column("reason").to_pylist() == ["wrong_answer"] * 2
    assert out.counters["pseudo_gold_rows"] == 1
    # 2 of 4 is not enough when 75% must agree; a single sample never makes a majority
    strict = _filter(traces, FilterConfig(min_agreement=0.75))
    assert set(strict.tables["rejected"].column("reason").to_pylist()) == {"no_consensus"}
    assert _filter([_trace(votes[0], gold=None)]).tables["kept"].num_rows == 0


def test_multiple_choice_and_labels_in_the_filter():
    q = "Where do you keep milk? (A) shelf (B) refrigerator (C) oven"
    mc = AnswerChecker("choice")
    traces = [_trace(" Milk spoils when warm, so it goes in the cold. The answer is (B).",
                     gold="B", question=q),
              _trace(" Milk spoils when warm. The answer is refrigerator.", gold="B", question=q),
              _trace(" Ovens are hot. The answer is (C).", gold="B", question=q)]
    out = _filter(traces, FilterConfig(min_steps=0), mc)
    kept = out.tables["kept"].to_pylist()
    assert [r["extractor"] for r in kept] == ["answer_is:letter", "answer_is:option_text"]
    assert [r["pred_answer"] for r in kept] == ["B", "B"]
    nli = AnswerChecker("label")
    t = [_trace(" A man sleeping cannot be running. The answer is contradiction.",
                gold="contradiction")]
    assert _filter(t, FilterConfig(min_steps=0), nli).tables["kept"].num_rows == 1


def test_funnel_png_and_json_are_written():
    from stages.filter.stage import draw_funnel

    c = _filter([c[0] for c in CASES], FilterConfig(max_tokens=256)).counters
    assert draw_funnel(c)[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(c)  # the counters go into funnel.json as they are


def test_empty_shard_keeps_schemas():
    out = _filter([])
    assert out.tables["kept"].num_rows == 0
    assert out.tables["rejected"].schema == rejected_schema(TRACE_SCHEMA_V2)


def test_traces_table_round_trips_token_arrays():
    rec, gen = _trace(" 5 + 3 = 8. The answer is 8.", n_tokens=4)
    gen.topk_ids = np.arange(12, dtype=np.int32).reshape(4, 3)
    table = traces_table([rec, rec], [gen, None], 3, fmt=1)
    row = table.to_pylist()
    assert row[0]["topk_ids"] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert row[0]["token_logprobs"] == [-0.5] * 4 and row[1]["token_ids"] == []
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32()))


def test_format_1_shards_filter_as_before():
    """A generate shard written before format 2 (float32 top-k) gives format-1 kept and
    rejected shards with the same rows as a format-2 one."""
    traces = [c[0] for c in CASES]
    table = traces_table([t[0] for t in traces], [t[1] for t in traces], 3, fmt=1)
    cfg = FilterConfig(max_tokens=256)
    params = FilterSettings(cfg, AnswerChecker("numeric", cfg.extractors, cfg.tolerance))
    old = filter_shard(params, Shard.of("s", table))
    new = filter_shard(params, Shard.of("s", traces_table([t[0] for t in traces],
                                                          [t[1] for t in traces], 3)))
    assert old.tables["kept"].schema == KEPT_SCHEMA
    assert old.tables["rejected"].schema == REJECTED_SCHEMA
    assert old.counters == new.counters
    for kind in ("kept", "rejected"):
        assert logical(new.tables[kind]).equals(old.tables[kind])
