"""The compact top-k store (shard format 2): the codec pair, the table conversion, the KD loss."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import topk_codec as codec
from pipeline.schema import TRACE_SCHEMA, TRACE_SCHEMA_V2, as_format, logical, traces_table
from stages.backends.base import Generation
from trainer.losses.topk_kd import topk_kd_loss

STEP = 2.0 ** -codec.DEFAULT_STEP_EXP


def _teacher(rng, n, k, vocab=49152, sharp=0.1):
    """[n, k] top-k rows like a teacher's: ids without repeats in a row, log-probabilities of a
    peaked distribution in descending order, the sampled token mostly the top-1."""
    with np.errstate(divide="ignore"):  # a sharp Dirichlet gives exact zeros: -inf entries
        full = np.log(rng.dirichlet(np.full(vocab if vocab < 5000 else 2000, sharp), n))
    order = np.argsort(-full, 1)[:, :k]
    lps = np.take_along_axis(full, order, 1).astype(np.float32)
    ids = order.astype(np.int32) if vocab < 5000 else rng.permutation(vocab)[:2000][order].astype(
        np.int32)
    sampled = np.where(rng.random(n) < 0.9, 0, rng.integers(0, k, n))
    tlp = lps[np.arange(n), sampled]
    return ids, lps, tlp, full


def test_leb128_round_trip_and_damage():
    values = np.array([0, 1, 127, 128, 300, 16383, 16384, 2 ** 35, 5], np.int64)
    data, sizes = codec.leb128_encode(values)
    assert sizes.tolist() == [1, 1, 1, 2, 2, 2, 3, 6, 1] and len(data) == sizes.sum()
    assert codec.leb128_decode(data).tolist() == values.tolist()
    with pytest.raises(codec.CodecError, match="truncated"):
        codec.leb128_decode(data[:-2])
    rng = np.random.default_rng(0)
    for _ in range(100):  # runs of long and short values, mixed
        v = (rng.pareto(0.5, rng.integers(1, 60)) * 10).astype(np.int64) % (1 << 40)
        assert codec.leb128_decode(codec.leb128_encode(v)[0]).tolist() == v.tolist()


def test_round_trip_keeps_ids_the_top_1_exactly_and_the_rest_within_half_a_step():
    rng = np.random.default_rng(0)
    ids, lps, tlp, _ = _teacher(rng, 300, 20)
    lps[5, 12:] = -np.inf                      # a short top-k
    ids[6, 3] = -1                             # an API token string without an id
    offsets = np.array([0, 100, 100, 250, 300])  # one row without positions
    id_rows, anchor, rows = codec.encode_rows(tlp, ids, lps, offsets)
    assert len(id_rows.starts) == len(rows.starts) == 5 and len(rows.row(1)) == 2  # header
    back_ids = codec.unpack_ids(id_rows, offsets, 20)
    back = codec.decode_rows(tlp, anchor, rows, offsets, 20)
    assert (back_ids == ids).all()
    assert np.array_equal(np.isinf(back), np.isinf(lps))
    finite = np.isfinite(lps)
    assert np.abs(back[finite] - lps[finite]).max() <= STEP / 2 + 1e-6
    assert np.abs(back[:, 0] - lps[:, 0]).max() <= 1e-6     # the top-1: exact (float32)


def test_unsorted_rows_are_stored_in_descending_order_with_their_ids():
    rng = np.random.default_rng(1)
    ids, lps, tlp, _ = _teacher(rng, 40, 8)
    perm = rng.permuted(np.tile(np.arange(8), (40, 1)), axis=1)
    shuffled_ids, shuffled_lps = np.take_along_axis(ids, perm, 1), np.take_along_axis(lps, perm, 1)
    offsets = np.array([0, 40])
    id_rows, anchor, rows = codec.encode_rows(tlp, shuffled_ids, shuffled_lps, offsets)
    assert (codec.unpack_ids(id_rows, offsets, 8) == ids).all()
    assert np.abs(codec.decode_rows(tlp, anchor, rows, offsets, 8) - lps).max() <= STEP / 2 + 1e-6


def test_large_vocabularies_take_three_bytes_an_id():
    ids = np.array([[151_000, 3], [0, 65_535]], np.int32)
    lps = np.log(np.array([[0.6, 0.3], [0.7, 0.2]], np.float32))
    id_rows, _, _ = codec.encode_rows(lps[:, 0], ids, lps, np.array([0, 2]))
    assert id_rows.row(0)[1] == 3 and len(id_rows.row(0)) == 2 + 4 * 3
    assert (codec.unpack_ids(id_rows, np.array([0, 2]), 2) == ids).all()
    small, _, _ = codec.encode_rows(lps[:, 0], ids % 60_000, lps, np.array([0, 2]))
    assert small.row(0)[1] == 2


def test_bad_input_and_damaged_bytes_are_refused():
    lps = np.array([[-0.1, np.nan]], np.float32)
    with pytest.raises(codec.CodecError, match="NaN"):
        codec.encode_rows(np.array([-0.1]), np.array([[1, 2]]), lps, np.array([0, 1]))
    with pytest.raises(codec.CodecError, match="shapes"):
        codec.encode_rows(np.array([-0.1, -1]), np.array([[1, 2]]), lps, np.array([0, 1]))
    good = np.array([[-0.1, -2.5]], np.float32)
    id_rows, anchor, rows = codec.encode_rows(np.array([-0.1]), np.array([[1, 2]]), good,
                                              np.array([0, 1]))
    with pytest.raises(codec.CodecError, match="codes where"):
        codec.decode_rows(np.array([-0.1]), anchor, codec.Packed.of([rows.row(0) + b"\x05"]),
                          np.array([0, 1]), 2)
    with pytest.raises(codec.CodecError, match="not top-k codes"):
        codec.decode_rows(np.array([-0.1]), anchor, codec.Packed.of([b"\x09" + rows.row(0)[1:]]),
                          np.array([0, 1]), 2)
    with pytest.raises(codec.CodecError, match="bytes of ids"):
        codec.unpack_ids(codec.Packed.of([id_rows.row(0)[:-1]]), np.array([0, 1]), 2)
    with pytest.raises(codec.CodecError, match="rows of ids for"):
        codec.unpack_ids(id_rows, np.array([0, 1, 1]), 2)


def _gens(rng, lengths, k):
    out = []
    for n in lengths:
        if n is None:
            out.append(None)
            continue
        ids, lps, tlp, _ = _teacher(rng, n, 20, vocab=500)
        out.append(Generation("x", "stop", ids[:, 0].copy(), tlp, ids[:, :k], lps[:, :k]))
    return out


def _records(n):
    return [{"id": str(i), "sample": 0, "question": "q", "gold": "1", "prompt": "p",
             "completion": "x", "finish_reason": "stop", "error": None} for i in range(n)]


@pytest.mark.parametrize("k", [20, 0])
def test_tables_convert_both_ways_with_failed_and_empty_rows(k):
    rng = np.random.default_rng(2)
    gens = _gens(rng, [7, None, 0, 13], k)
    v1 = traces_table(_records(4), gens, k, fmt=1)
    v2 = traces_table(_records(4), gens, k)
    assert v1.schema == TRACE_SCHEMA and v2.schema == TRACE_SCHEMA_V2
    assert as_format(v1, 2).equals(v2) and logical(v1) is v1
    back = logical(v2)
    assert back.schema == TRACE_SCHEMA
    assert back.column("topk_ids").equals(v1.column("topk_ids"))
    a = v1.column("topk_logprobs").to_pylist()
    b = back.column("topk_logprobs").to_pylist()
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb) and all(len(x) == k for x in rb)
        if ra and k:
            assert np.abs(np.array(ra) - np.array(rb)).max() <= STEP / 2 + 1e-6
    # a slice of rows (the filter takes some) converts alike
    part = v2.take(pa.array([3, 0]))
    assert logical(part).column("topk_ids").to_pylist() == [
        v1.column("topk_ids").to_pylist()[3], v1.column("topk_ids").to_pylist()[0]]


def test_kd_loss_from_format_2_is_within_1e_3_nats_of_float32():
    """The loss the trainer computes (bucket tail, T = 1 and 2) from stored rows."""
    rng = np.random.default_rng(3)
    ids, lps, tlp, _ = _teacher(rng, 2000, 20, vocab=1000, sharp=0.05)
    offsets = np.array([0, 2000])
    id_rows, anchor, rows = codec.encode_rows(tlp, ids, lps, offsets)
    back = codec.decode_rows(tlp, anchor, rows, offsets, 20)
    student = torch.randn(2000, 1000) * 2
    for temperature in (1.0, 2.0):
        exact = topk_kd_loss(student, torch.tensor(ids), torch.tensor(lps), temperature)
        stored = topk_kd_loss(student, torch.tensor(ids), torch.tensor(back), temperature)
        assert abs(exact.item() - stored.item()) < 1e-3, temperature
