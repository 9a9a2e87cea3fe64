"""The Arrow schemas of the shards the stages hand to each other, and how trace shards are built.

Every shard is written with an explicit schema: top-k lists are ragged, and a schema inferred
from the first rows would break on them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

# generate: one row per (task row, sample)
TRACE_SCHEMA = pa.schema([
    ("id", pa.string()), ("sample", pa.int32()), ("question", pa.string()),
    ("gold", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("finish_reason", pa.string()), ("token_ids", pa.list_(pa.int32())),
    ("token_logprobs", pa.list_(pa.float32())),
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("error", pa.string()),
])

# filter: the trace, plus what the checks found; rejected rows also carry their reason
FILTER_COLUMNS = [
    ("pred_answer", pa.string()), ("extractor", pa.string()), ("rationale", pa.string()),
    ("n_steps", pa.int32()), ("n_tokens", pa.int32()), ("n_words", pa.int32()),
    ("n_equations", pa.int32()), ("repeat_share", pa.float32()),
    ("gold_source", pa.string()), ("agreement", pa.float32()), ("detail", pa.string())]
KEPT_SCHEMA = pa.schema(list(TRACE_SCHEMA) + [pa.field(n, t) for n, t in FILTER_COLUMNS])
REJECTED_SCHEMA = KEPT_SCHEMA.append(pa.field("reason", pa.string()))

# eval: one row per held-out row and system
PREDICTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("output", pa.string()),
    ("gold", pa.string()), ("pred_answer", pa.string()), ("extractor", pa.string()),
    ("correct", pa.bool_()), ("n_tokens", pa.int32()), ("finish_reason", pa.string())])


class TokenArrays(Protocol):
    """What a trace row needs of a generation: per generated token, its id and
    log-probability, and the teacher's top-k ids and log-probabilities ([T] and [T, k])."""

    token_ids: np.ndarray
    token_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


def _nested(values: list[np.ndarray], dtype) -> pa.Array:
    """list<list<x>> from per-row [T, k] arrays, without per-token Python work."""
    lengths = np.array([v.shape[0] for v in values], dtype=np.int64)
    k = values[0].shape[1] if values and values[0].ndim == 2 else 0
    flat = (np.concatenate([v.reshape(-1) for v in values]) if values
            else np.zeros(0)).astype(dtype.to_pandas_dtype())
    inner_offsets = np.arange(0, lengths.sum() * k + 1, k if k else 1, dtype=np.int32)[
        : int(lengths.sum()) + 1]
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat, type=dtype))
    outer_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def _flat(values: list[np.ndarray], dtype) -> pa.Array:
    lengths = np.array([v.shape[0] for v in values], dtype=np.int64)
    flat = (np.concatenate(values) if values else np.zeros(0)).astype(dtype.to_pandas_dtype())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def traces_table(records: list[dict], gens: list[TokenArrays | None], k: int) -> pa.Table:
    """A trace shard: `records` hold the scalar columns, `gens` the token arrays (None for a
    row whose generation failed)."""
    empty2 = np.zeros((0, k))
    cols = {name: [r[name] for r in records] for name in
            ("id", "sample", "question", "gold", "prompt", "completion", "finish_reason",
             "error")}
    token_ids = [g.token_ids if g else np.zeros(0) for g in gens]
    token_lp = [g.token_logprobs if g else np.zeros(0) for g in gens]
    topk_ids = [g.topk_ids if g else empty2 for g in gens]
    topk_lp = [g.topk_logprobs if g else empty2 for g in gens]
    arrays = {
        **{n: pa.array(cols[n], type=TRACE_SCHEMA.field(n).type) for n in cols},
        "token_ids": _flat(token_ids, pa.int32()),
        "token_logprobs": _flat(token_lp, pa.float32()),
        "topk_ids": _nested(topk_ids, pa.int32()),
        "topk_logprobs": _nested(topk_lp, pa.float32()),
    }
    return pa.table({f.name: arrays[f.name] for f in TRACE_SCHEMA}, schema=TRACE_SCHEMA)
