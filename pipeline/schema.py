"""The Arrow schemas of the shards the stages hand to each other, and how trace shards are built.

Every shard is written with an explicit schema: top-k lists are ragged, and a schema inferred
from the first rows would break on them.

Trace shards come in two formats, told apart by their columns (a shard describes itself):
format 1 stores the teacher's top-k log-probabilities as float32 lists (`topk_logprobs`),
format 2 (the default) as `topk_anchor` + `topk_codes` (see `pipeline/topk_codec.py`), about a
third of the bytes. `logical` turns either into format 1's columns, which is what a reader of
log-probabilities wants; `as_format` converts a table.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import topk_codec

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

# format 2: the same, the top-k log-probabilities compacted (pipeline/topk_codec.py)
TRACE_SCHEMA_V2 = pa.schema(
    [f for f in TRACE_SCHEMA if f.name not in ("topk_ids", "topk_logprobs", "error")]
    + [pa.field("topk_ids_packed", pa.binary()), pa.field("topk_anchor", pa.list_(pa.float32())),
       pa.field("topk_codes", pa.binary()), TRACE_SCHEMA.field("error")])
FORMATS = (1, 2)
DEFAULT_FORMAT = 2
TOPK_V1 = ("topk_ids", "topk_logprobs")
TOPK_V2 = ("topk_ids_packed", "topk_anchor", "topk_codes")

# filter: the trace, plus what the checks found; rejected rows also carry their reason
FILTER_COLUMNS = [
    ("pred_answer", pa.string()), ("extractor", pa.string()), ("rationale", pa.string()),
    ("n_steps", pa.int32()), ("n_tokens", pa.int32()), ("n_words", pa.int32()),
    ("n_equations", pa.int32()), ("repeat_share", pa.float32()),
    ("gold_source", pa.string()), ("agreement", pa.float32()), ("detail", pa.string()),
    # where the trace came from: its generate round (1 = the first samples), whether its
    # prompt held the gold answer (rationalization) and who sampled it (`teacher`, or
    # `student`: a distilled student of `distill iterate`, whose round is the loop's round)
    ("round", pa.int16()), ("hinted", pa.bool_()), ("sampler", pa.string())]


def kept_schema(traces: pa.Schema = TRACE_SCHEMA, own: list | tuple = ()) -> pa.Schema:
    """The filter's kept shards for trace shards of schema `traces` (either format); `own`:
    (name, type) of the columns that checks record besides the usual ones."""
    return pa.schema(list(traces.remove_metadata())
                     + [pa.field(n, t) for n, t in [*FILTER_COLUMNS, *own]])


def rejected_schema(traces: pa.Schema = TRACE_SCHEMA, own: list | tuple = ()) -> pa.Schema:
    return kept_schema(traces, own).append(pa.field("reason", pa.string()))


KEPT_SCHEMA, REJECTED_SCHEMA = kept_schema(), rejected_schema()

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
    inner_offsets = np.arange(int(lengths.sum()) + 1, dtype=np.int32) * k
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat, type=dtype))
    outer_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def _flat(values: list[np.ndarray], dtype) -> pa.Array:
    lengths = np.array([v.shape[0] for v in values], dtype=np.int64)
    flat = (np.concatenate(values) if values else np.zeros(0)).astype(dtype.to_pandas_dtype())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def traces_table(records: list[dict], gens: list[TokenArrays | None], k: int,
                 fmt: int = DEFAULT_FORMAT) -> pa.Table:
    """A trace shard in format `fmt`: `records` hold the scalar columns, `gens` the token
    arrays (None for a row whose generation failed)."""
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
    table = pa.table({f.name: arrays[f.name] for f in TRACE_SCHEMA}, schema=TRACE_SCHEMA)
    return as_format(table, fmt)


def shard_format(schema: pa.Schema) -> int:
    """1 or 2 for a table holding top-k columns; 0 for one without (eval, tests' tables)."""
    names = set(schema.names)
    return 2 if "topk_codes" in names else 1 if "topk_logprobs" in names else 0


def topk_columns(schema: pa.Schema) -> list[str]:
    """What a reader of the top-k log-probabilities must read from a shard of `schema`."""
    fmt = shard_format(schema)
    return (list(TOPK_V1) if fmt == 1 else ["token_logprobs", *TOPK_V2] if fmt == 2 else [])


def _replace(table: pa.Table, drop: tuple[str, ...], add: dict[str, pa.Array]) -> pa.Table:
    """`table` with the columns `drop` replaced by `add`, at the place of the first one."""
    at = table.schema.get_field_index(drop[0])
    for name in drop:
        table = table.remove_column(table.schema.get_field_index(name))
    for i, (name, array) in enumerate(add.items()):
        table = table.add_column(at + i, name, array)
    return table


def _positions(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The rows' position offsets [R + 1] and the sampled tokens' log-probabilities [N]."""
    tlp = table.column("token_logprobs").combine_chunks()
    offsets = tlp.offsets.to_numpy().astype(np.int64)
    flat = tlp.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return offsets - offsets[0], flat


def _topk_matrix(column: pa.ChunkedArray, n: int, dtype) -> tuple[np.ndarray, int]:
    """A list<list<x>> column (the same k entries at every position) as an [n, k] array."""
    inner = column.combine_chunks().flatten()
    lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False) if len(inner) else \
        np.zeros(0, np.int64)
    k = int(lengths.max()) if lengths.size else 0
    if lengths.size != n or (lengths != k).any():
        raise ValueError(f"top-k rows of unequal length ({int(lengths.min())}..{k} entries) or "
                         f"not one per generated token ({lengths.size} rows, {n} tokens)")
    values = inner.flatten().to_numpy(zero_copy_only=False)
    return values.astype(dtype).reshape(n, k), k


def _packed(column: pa.ChunkedArray) -> topk_codec.Packed:
    """A binary column's rows as the codec takes them (its data and offsets, no copy)."""
    arr = column.combine_chunks()
    _, offsets, data = arr.buffers()
    starts = np.frombuffer(offsets, np.int32)[arr.offset:arr.offset + len(arr) + 1]
    return topk_codec.Packed(np.frombuffer(data, np.uint8) if data is not None else
                             np.zeros(0, np.uint8), starts.astype(np.int64))


def _binary(packed: topk_codec.Packed) -> pa.Array:
    rows = len(packed.starts) - 1
    return pa.BinaryArray.from_buffers(pa.binary(), rows, [
        None, pa.py_buffer(packed.starts.astype(np.int32)), pa.py_buffer(packed.data)])


def _k_of(ids: topk_codec.Packed, offsets: np.ndarray) -> int:
    """k from the ids' bytes: a row's id bytes / (positions x width)."""
    positions = np.diff(offsets)
    lengths = np.diff(ids.starts) - topk_codec.HEADER
    rows = np.flatnonzero(positions > 0)
    if not rows.size:
        return 0
    r = int(rows[0])
    return int(lengths[r]) // (int(positions[r]) * int(ids.data[ids.starts[r] + 1]))


def as_format(table: pa.Table, fmt: int, step_exp: int = topk_codec.DEFAULT_STEP_EXP
              ) -> pa.Table:
    """`table` (a trace, kept or rejected shard of either format) in format `fmt`; other
    columns untouched. Format 2 to 1 gives the log-probabilities as stored (quantised)."""
    if fmt not in FORMATS:
        raise ValueError(f"shard format must be one of {FORMATS}, got {fmt!r}")
    have = shard_format(table.schema)
    if have in (0, fmt):
        return table
    offsets, tlp = _positions(table)
    n = len(tlp)
    outer = pa.array(offsets.astype(np.int32))
    if fmt == 2:
        ids, _ = _topk_matrix(table.column("topk_ids"), n, np.int32)
        lps, _ = _topk_matrix(table.column("topk_logprobs"), n, np.float32)
        packed_ids, anchor, codes = topk_codec.encode_rows(tlp, ids, lps, offsets, step_exp)
        return _replace(table, TOPK_V1, {
            "topk_ids_packed": _binary(packed_ids),
            "topk_anchor": pa.ListArray.from_arrays(outer, pa.array(anchor, pa.float32())),
            "topk_codes": _binary(codes)})
    packed_ids = _packed(table.column("topk_ids_packed"))
    k = _k_of(packed_ids, offsets)
    ids = topk_codec.unpack_ids(packed_ids, offsets, k)
    anchor = table.column("topk_anchor").combine_chunks().flatten().to_numpy(
        zero_copy_only=False)
    lps = topk_codec.decode_rows(tlp, anchor, _packed(table.column("topk_codes")), offsets, k)
    return _replace(table, TOPK_V2, {"topk_ids": _nested_from(ids, offsets, pa.int32()),
                                     "topk_logprobs": _nested_from(lps, offsets, pa.float32())})


def _nested_from(matrix: np.ndarray, offsets: np.ndarray, dtype) -> pa.Array:
    n, k = matrix.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k),
                                     pa.array(matrix.reshape(-1), type=dtype))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)


def logical(table: pa.Table) -> pa.Table:
    """`table` with the top-k as format 1's `topk_ids` / `topk_logprobs` columns (float32
    log-probabilities), whatever format it was stored in; format-2-only columns dropped."""
    return as_format(table, 1)
