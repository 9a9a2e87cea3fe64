"""The compact store of the teacher's top-k log-probabilities (shard format 2).

Per generated token the teacher gives k (id, log-probability) pairs. Format 1 stores them as
int32 and float32 lists. Format 2 (measured on the demo by `make bench ONLY=shards`: 36.5
instead of 115.8 bytes per generated token at k = 20, KD loss within 2.4e-5 nats per token):

- each position's entries are put in descending order of log-probability (the order vLLM and
  the APIs give them; the KD loss does not depend on it);
- ids: id + 1 (0 = no id: an API's token string without one) as little-endian unsigned
  integers of the narrowest width that holds the row's ids (2 bytes up to 65,535 tokens, else
  3). zstd models these bytes better than Parquet's int32 lists (20.1 vs 22.6 bytes per token
  on the demo);
- the top-1 log-probability is kept exact, as its offset from the sampled token's own
  log-probability, which the shard holds anyway (`token_logprobs`, float32): the offset is 0.0
  wherever the sampled token is the top-1 (95% of the demo's positions) and costs 0.2 bytes;
- every entry is quantised as `code = round((top1 - logprob) / step)`, so the top-1 has code 0
  and an entry is off by at most step / 2 nats; step = 2^-5 nats by default;
- codes are stored as differences from the previous rank (non-negative, mostly < 16) as
  LEB128 varints (7 bits a byte), so zstd sees whole bytes; an entry that is -inf (no such
  token: an unmapped API string, a short top-k) is the value 0, a difference d is d + 1.

Ids and codes are one `binary` value per row each, and each value begins with a two-byte
header (version; the ids' width or the step's -log2), so a row describes itself wherever it
travels (a filter shard, rows merged from two shards).

Rows travel as Arrow lays out a binary column: `Packed(data, starts)`, the bytes of all rows
and the row boundaries [R + 1]. Positions travel as one array [N, ...] with the rows' position
boundaries `offsets` [R + 1]. Both directions are vectorised over a whole shard (no Python
work per row or per token).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

VERSION = 1
DEFAULT_STEP_EXP = 5  # step = 2 ** -5 nats = 0.03125: the largest error is 0.0156 nats
HEADER = 2


class CodecError(ValueError):
    """Input the codec cannot store, or bytes it cannot read."""


class Packed(NamedTuple):
    """Binary rows: row r is data[starts[r]:starts[r + 1]]."""

    data: np.ndarray     # uint8
    starts: np.ndarray   # int64 [R + 1]

    def row(self, r: int) -> bytes:
        return self.data[self.starts[r]:self.starts[r + 1]].tobytes()

    @classmethod
    def of(cls, rows: list[bytes]) -> "Packed":
        lengths = np.array([len(r) for r in rows], np.int64)
        return cls(np.frombuffer(b"".join(rows), np.uint8),
                   np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


# ---------------------------------------------------------------- LEB128 varints

def _leb128_sizes(v: np.ndarray) -> np.ndarray:
    """Bytes each non-negative integer of `v` (uint64) takes as LEB128."""
    nbytes = np.ones(v.shape, np.int64)
    rest = v >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest = rest >> np.uint64(7)
    return nbytes


def leb128_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative integers as LEB128 bytes (uint8), and each value's size in bytes."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    nbytes = _leb128_sizes(v)
    if v.size == 0:
        return np.zeros(0, np.uint8), nbytes
    if (nbytes == 1).all():  # the common case: every value below 128
        return v.astype(np.uint8), nbytes
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    owner = np.repeat(np.arange(v.size), nbytes)
    within = np.arange(int(nbytes.sum())) - np.repeat(starts, nbytes)
    chunk = (v[owner] >> (np.uint64(7) * within.astype(np.uint64))) & np.uint64(127)
    last = within == (nbytes[owner] - 1)
    return (chunk | np.where(last, 0, 128).astype(np.uint64)).astype(np.uint8), nbytes


def leb128_decode(data: np.ndarray) -> np.ndarray:
    """The integers of LEB128 bytes (int64); a truncated value is an error. Values below 128
    (one byte, nearly all of them here) cost one pass; only longer ones are worked on."""
    b = np.asarray(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    cont = np.flatnonzero(b >= 128)
    if not cont.size:
        return b.astype(np.int64)
    if cont[-1] == b.size - 1:
        raise CodecError("the codes end inside a value (truncated bytes)")
    out = b.astype(np.int64)
    # a longer value: its first byte is a continuation byte after a last byte (or at 0)
    starts = cont[(cont == 0) | (b[cont - 1] < 128)]
    total = out[starts] & 127
    alive = np.ones(starts.size, bool)
    for j in range(1, 10):
        at = starts + j
        total = np.where(alive, total | ((out[np.minimum(at, b.size - 1)] & 127) << (7 * j)),
                         total)
        ends_here = alive & (b[np.minimum(at, b.size - 1)] < 128)
        out[at[ends_here]] = total[ends_here]
        alive &= ~ends_here
        if not alive.any():
            break
    else:
        raise CodecError("a code longer than 9 bytes (damaged bytes)")
    return out[b < 128]


# ---------------------------------------------------------------- rows with headers

def _with_headers(payload: np.ndarray, bounds: np.ndarray, first: int,
                  second: np.ndarray) -> Packed:
    """Rows = a two-byte header (`first`, `second[r]`) + payload[bounds[r]:bounds[r + 1]]."""
    rows = len(bounds) - 1
    starts = bounds + HEADER * np.arange(rows + 1)
    data = np.empty(payload.size + HEADER * rows, np.uint8)
    head = np.zeros(data.size, bool)
    head[starts[:-1]] = True
    head[starts[:-1] + 1] = True
    data[~head] = payload
    data[starts[:-1]] = first
    data[starts[:-1] + 1] = second
    return Packed(data, starts.astype(np.int64))


def _headers(packed: Packed, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's second header byte, and the rows' payload bytes (headers removed)."""
    data, starts = np.asarray(packed.data, np.uint8), np.asarray(packed.starts, np.int64)
    lengths = np.diff(starts)
    if (lengths < HEADER).any():
        bad = int(np.flatnonzero(lengths < HEADER)[0])
        raise CodecError(f"row {bad}: {lengths[bad]} bytes, shorter than the {what} header")
    first = data[starts[:-1]]
    if (first != VERSION).any():
        bad = int(np.flatnonzero(first != VERSION)[0])
        raise CodecError(f"row {bad}: not top-k {what} of version {VERSION} (header "
                         f"{packed.row(bad)[:HEADER]!r})")
    head = np.zeros(data.size, bool)
    head[starts[:-1]] = True
    head[starts[:-1] + 1] = True
    return data[starts[:-1] + 1], data[starts[0]:starts[-1]][~head[starts[0]:starts[-1]]]


# ---------------------------------------------------------------- ids

def pack_ids(ids: np.ndarray, offsets: np.ndarray) -> Packed:
    """Each row's ids [positions, k]: version, width w, then id + 1 as w-byte little-endian
    integers (0 = no id)."""
    ids = np.asarray(ids, np.int64)
    offsets = np.asarray(offsets, np.int64)
    if ids.size and (ids.min() < -1 or ids.max() >= (1 << 24) - 1):
        raise CodecError("token ids must be -1 (unknown) or in 0..16,777,214")
    k = ids.shape[1] if ids.ndim == 2 else 0
    planes = (ids.reshape(-1) + 1).astype("<u4").view(np.uint8).reshape(-1, 4)
    entries = np.diff(offsets) * k
    wide = _row_any(planes[:, 2] > 0, offsets * k)
    width = np.where(wide, 3, 2)
    keep = np.zeros(planes.shape, bool)
    keep[:, :2] = True
    keep[:, 2] = np.repeat(wide, entries)
    bounds = np.concatenate([[0], np.cumsum(entries * width)])
    return _with_headers(planes[keep], bounds, VERSION, width)


def _row_any(flags: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per row (flags[bounds[r]:bounds[r + 1]]): whether any flag is set."""
    counts = np.concatenate([[0], np.cumsum(flags.astype(np.int64))])
    return counts[bounds[1:]] > counts[bounds[:-1]]


def unpack_ids(packed: Packed, offsets: np.ndarray, k: int) -> np.ndarray:
    """The ids [N, k] int32 of `pack_ids`' rows (-1 = no id)."""
    offsets = np.asarray(offsets, np.int64)
    n = int(offsets[-1] - offsets[0]) if len(offsets) else 0
    if len(packed.starts) != len(offsets):
        raise CodecError(f"{len(packed.starts) - 1} rows of ids for {len(offsets) - 1} rows")
    width, payload = _headers(packed, "ids")
    if not np.isin(width, (2, 3)).all():
        raise CodecError(f"ids of width {sorted(set(width.tolist()) - {2, 3})} bytes (2 or 3 "
                         "expected: damaged bytes)")
    entries = np.diff(offsets) * k
    expected = entries * width
    have = np.diff(packed.starts) - HEADER
    if (have != expected).any():
        bad = int(np.flatnonzero(have != expected)[0])
        raise CodecError(f"row {bad}: {have[bad]} bytes of ids where {entries[bad]} ids of "
                         f"{width[bad]} bytes were expected (damaged or mismatched columns)")
    if n * k == 0:
        return np.zeros((n, k), np.int32)
    if (width == 2).all():  # every id below 65,535: a view
        return (payload.view("<u2").astype(np.int32) - 1).reshape(n, k)
    w = np.repeat(width, entries)
    at = np.concatenate([[0], np.cumsum(w)[:-1]]).astype(np.int64)
    value = payload[at].astype(np.int64) | (payload[at + 1].astype(np.int64) << 8)
    if (w == 3).any():
        three = w == 3
        value[three] |= payload[at[three] + 2].astype(np.int64) << 16
    return (value - 1).astype(np.int32).reshape(n, k)


# ---------------------------------------------------------------- the codec

def encode_rows(token_logprobs: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                offsets: np.ndarray, step_exp: int = DEFAULT_STEP_EXP
                ) -> tuple[Packed, np.ndarray, Packed]:
    """Format-2 columns of rows whose positions are concatenated.

    token_logprobs [N] (the sampled tokens'), topk_ids [N, k], topk_logprobs [N, k] (any
    order; -inf = no entry), offsets [R + 1] (row r holds positions offsets[r]:offsets[r+1]).
    Returns the rows' ids (in descending order of log-probability), the top-1 offsets [N]
    float32 (top-1 minus the sampled token's log-probability) and the rows' codes.
    """
    lps = np.asarray(topk_logprobs, np.float32)
    ids = np.asarray(topk_ids, np.int32)
    tlp = np.asarray(token_logprobs, np.float32)
    offsets = np.asarray(offsets, np.int64)
    n = lps.shape[0]
    if lps.ndim != 2 or ids.shape != lps.shape or tlp.shape != (n,) or offsets[-1] != n:
        raise CodecError(f"shapes do not match: token_logprobs {tlp.shape}, topk_ids "
                         f"{ids.shape}, topk_logprobs {lps.shape}, {offsets[-1]} positions")
    if np.isnan(lps).any() or (lps > 0).any():
        raise CodecError("top-k log-probabilities must be <= 0 or -inf (found NaN or a "
                         "positive value)")
    if not np.isfinite(tlp).all():
        raise CodecError("a sampled token's log-probability is not finite")
    if not 0 <= step_exp <= 20:
        raise CodecError(f"step exponent {step_exp} is outside 0..20")
    with np.errstate(invalid="ignore"):  # -inf - -inf: a short top-k's tail, in order
        ordered = (np.diff(lps, axis=1) <= 0) | np.isneginf(lps[:, 1:])
    if not ordered.all():
        order = np.argsort(-lps, axis=1, kind="stable")
        lps, ids = np.take_along_axis(lps, order, 1), np.take_along_axis(ids, order, 1)
    k = lps.shape[1]
    packed_ids = pack_ids(ids, offsets)
    rows = len(offsets) - 1
    if k == 0:
        return packed_ids, np.zeros(n, np.float32), _with_headers(
            np.zeros(0, np.uint8), np.zeros(rows + 1, np.int64), VERSION,
            np.full(rows, step_exp))
    finite = np.isfinite(lps)
    top = lps[:, 0]
    anchor = np.where(np.isfinite(top), top - tlp, 0.0).astype(np.float32)
    # the top-1 as the decoder will rebuild it, so codes are relative to what it will see
    top_back = (tlp + anchor).astype(np.float64)
    codes = np.rint((top_back[:, None] - np.where(finite, lps, 0)) * (1 << step_exp))
    codes = np.maximum(np.where(finite, codes, 0), 0).astype(np.int64)
    diffs = np.diff(codes, axis=1, prepend=0)
    values = np.where(finite, np.maximum(diffs, 0) + 1, 0).reshape(-1)
    data, nbytes = leb128_encode(values)
    cum = np.concatenate([[0], np.cumsum(nbytes)])
    return packed_ids, anchor, _with_headers(data, cum[offsets * k], VERSION,
                                             np.full(rows, step_exp))


def decode_rows(token_logprobs: np.ndarray, anchor: np.ndarray, codes: Packed,
                offsets: np.ndarray, k: int) -> np.ndarray:
    """The top-k log-probabilities [N, k] float32 of format-2 rows (`encode_rows`' codes).
    Raises CodecError for bytes that do not decode to k values per position."""
    tlp = np.asarray(token_logprobs, np.float32)
    offsets = np.asarray(offsets, np.int64)
    n = tlp.shape[0]
    if len(codes.starts) != len(offsets):
        raise CodecError(f"{len(codes.starts) - 1} rows of codes for {len(offsets) - 1} rows")
    step_exp, payload = _headers(codes, "codes")
    if (step_exp > 20).any():
        raise CodecError("a step exponent above 20 (damaged bytes)")
    if k == 0 or n == 0:
        return np.zeros((n, k), np.float32)
    values = leb128_decode(payload)
    if values.size != n * k:
        raise CodecError(f"{values.size} codes where {n} positions x k={k} = {n * k} were "
                         "expected (damaged or mismatched columns)")
    values = values.astype(np.int32).reshape(n, k)
    codes_ = np.cumsum(np.maximum(values - 1, 0), axis=1, dtype=np.int32)
    # float32 is exact here: code x 2^-e is a float32, and the one subtraction rounds once
    step = np.repeat(np.ldexp(np.float32(1), -step_exp.astype(np.int32)), np.diff(offsets))
    top = tlp + np.asarray(anchor, np.float32)
    out = top[:, None] - codes_.astype(np.float32) * step[:, None]
    out[values == 0] = -np.inf
    return out
