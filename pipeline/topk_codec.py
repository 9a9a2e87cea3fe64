"""The compact store of the teacher's top-k log-probabilities (shard format 2).

Per generated token the teacher gives k (id, log-probability) pairs. Format 1 stores them as
float32 and int32 lists: about 107 of the demo's 116 bytes per generated token. Format 2:

- ids as little-endian unsigned integers of the narrowest width that holds the row's ids
  (2 bytes for vocabularies up to 65,535 tokens, else 3), the value id + 1 (0 = no id, an
  API's token string without one), one `binary` value per row: zstd models these bytes
  better than Parquet's int32 lists (21.4 vs 22.6 bytes per token on the demo);

- each position's entries are put in descending order of log-probability (the order vLLM and
  the APIs give them; the KD loss does not depend on it);
- the top-1 log-probability is kept exact, as its offset from the sampled token's own
  log-probability, which the shard holds anyway (`token_logprobs`, float32): the offset is 0.0
  wherever the sampled token is the top-1 (95% of the demo's positions);
- every entry is quantised as `code = round((top1 - logprob) / step)`, so the top-1 has code 0
  and an entry is off by at most step / 2 nats; `step` = 2^-5 nats by default;
- codes are stored as differences from the previous rank (non-negative, mostly < 16), as
  LEB128 varints (7 bits a byte), one `binary` value per row, so zstd sees whole bytes; an
  entry that is -inf (no such token: an API's unmapped string, a short top-k) is the value 0,
  a finite difference d is d + 1.

Each row's bytes begin with a header (codes: version and -log2 of the step; ids: version and
width), so a row describes itself wherever it travels (a filter shard, a merged table). Measured on the demo
(see the README and `make bench ONLY=shards`): 116 -> ~36 bytes per generated token, KD-loss
difference ~1e-5 nats per token.

Both directions are vectorised over a whole shard: `encode_rows` / `decode_rows` take the
concatenated positions of all rows and the rows' position offsets.
"""

from __future__ import annotations

import numpy as np

VERSION = 1
DEFAULT_STEP_EXP = 5  # step = 2 ** -5 nats = 0.03125: the largest error is 0.0156 nats


class CodecError(ValueError):
    """Input the codec cannot store or bytes it cannot read."""


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
    """Non-negative integers as LEB128 bytes (uint8), vectorised, and each value's size."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    nbytes = _leb128_sizes(v)
    if v.size == 0:
        return np.zeros(0, np.uint8), nbytes
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    owner = np.repeat(np.arange(v.size), nbytes)
    within = np.arange(int(nbytes.sum())) - np.repeat(starts, nbytes)
    chunk = (v[owner] >> (np.uint64(7) * within.astype(np.uint64))) & np.uint64(127)
    last = within == (nbytes[owner] - 1)
    return (chunk | np.where(last, 0, 128).astype(np.uint64)).astype(np.uint8), nbytes


def leb128_decode(data: np.ndarray) -> np.ndarray:
    """The integers of LEB128 bytes (int64), vectorised; a truncated value is an error."""
    b = np.asarray(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    ends = b < 128
    if not ends[-1]:
        raise CodecError("the codes end inside a value (truncated bytes)")
    group = np.concatenate([[0], np.cumsum(ends)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    within = np.arange(b.size) - starts[group]
    if within.max() > 8:
        raise CodecError("a code longer than 9 bytes (damaged bytes)")
    parts = (b & 127).astype(np.int64) << (7 * within)
    return np.add.reduceat(parts, starts)


# ---------------------------------------------------------------- the codec

def encode_rows(token_logprobs: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                offsets: np.ndarray, step_exp: int = DEFAULT_STEP_EXP
                ) -> tuple[list[bytes], np.ndarray, list[bytes]]:
    """Format-2 columns of rows whose positions are concatenated.

    token_logprobs [N] (the sampled tokens'), topk_ids [N, k], topk_logprobs [N, k] (any
    order; -inf = no entry), offsets [R + 1] (row r holds positions offsets[r]:offsets[r+1]).
    Returns per row the ids' bytes (in descending order of log-probability), the top-1 offsets
    [N] float32 (top-1 minus the sampled token's log-probability) and per row the codes' bytes.
    """
    lps = np.asarray(topk_logprobs, np.float32)
    ids = np.asarray(topk_ids, np.int32)
    tlp = np.asarray(token_logprobs, np.float32)
    n = lps.shape[0]
    if lps.ndim != 2 or ids.shape != lps.shape or tlp.shape != (n,):
        raise CodecError(f"shapes do not match: token_logprobs {tlp.shape}, topk_ids "
                         f"{ids.shape}, topk_logprobs {lps.shape}")
    if np.isnan(lps).any() or np.isposinf(lps).any() or (lps > 0).any():
        raise CodecError("top-k log-probabilities must be <= 0 or -inf (found NaN, +inf or "
                         "a positive value)")
    if not np.isfinite(tlp).all():
        raise CodecError("a sampled token's log-probability is not finite")
    if not 0 <= step_exp <= 20:
        raise CodecError(f"step exponent {step_exp} is outside 0..20")
    order = np.argsort(-lps, axis=1, kind="stable")
    lps = np.take_along_axis(lps, order, 1)
    ids = np.take_along_axis(ids, order, 1)
    k = lps.shape[1]
    offsets = np.asarray(offsets, np.int64)
    id_rows = pack_ids(ids, offsets)
    header = bytes([VERSION, step_exp])
    if k == 0:
        return id_rows, np.zeros(n, np.float32), [header] * (len(offsets) - 1)
    top = lps[:, 0]
    finite = np.isfinite(lps)
    anchor = np.where(np.isfinite(top), top - tlp, 0.0).astype(np.float32)
    # the top-1 as the decoder will rebuild it, so codes are relative to what it will see
    top_back = (tlp + anchor).astype(np.float32)
    codes = np.rint((top_back[:, None].astype(np.float64) - np.where(finite, lps, 0))
                    * (1 << step_exp))
    codes = np.maximum(np.where(finite, codes, 0), 0).astype(np.int64)
    diffs = np.diff(np.concatenate([np.zeros((n, 1), np.int64), codes], 1), axis=1)
    values = np.where(finite, np.maximum(diffs, 0) + 1, 0).reshape(-1)
    data, nbytes = leb128_encode(values)
    # each row's bytes: a row holds k values per position
    cum = np.concatenate([[0], np.cumsum(nbytes)])
    starts = cum[offsets * k]
    blob = data.tobytes()
    rows = [header + blob[starts[r]:starts[r + 1]] for r in range(len(offsets) - 1)]
    return id_rows, anchor, rows


def pack_ids(ids: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """Each row's ids [positions, k] as bytes: version, width w, then id + 1 as w-byte
    little-endian integers (0 = no id)."""
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < -1 or ids.max() >= (1 << 24) - 1):
        raise CodecError("token ids must be -1 (unknown) or in 0..16,777,214")
    k = ids.shape[1] if ids.ndim == 2 else 0
    planes = (ids.reshape(-1) + 1).astype("<u4").view(np.uint8).reshape(-1, 4)
    rows = []
    for r in range(len(offsets) - 1):
        part = planes[offsets[r] * k:offsets[r + 1] * k]
        width = 2 if not part.size or not part[:, 2].any() else 3
        rows.append(bytes([VERSION, width]) + part[:, :width].tobytes())
    return rows


def unpack_ids(rows: list[bytes | None], offsets: np.ndarray, k: int) -> np.ndarray:
    """The ids [N, k] int32 of `pack_ids`' rows (-1 = no id)."""
    offsets = np.asarray(offsets, np.int64)
    n = int(offsets[-1] - offsets[0]) if len(offsets) else 0
    out = np.zeros((n * k, 4), np.uint8)
    for r, raw in enumerate(rows):
        count = int(offsets[r + 1] - offsets[r]) * k
        if count == 0:
            continue
        raw = raw or b""
        if len(raw) < 2 or raw[0] != VERSION or raw[1] not in (2, 3):
            raise CodecError(f"row {r}: not top-k ids of version {VERSION} (header {raw[:2]!r})")
        width = raw[1]
        if len(raw) - 2 != count * width:
            raise CodecError(f"row {r}: {len(raw) - 2} bytes of ids where {count} ids of "
                             f"{width} bytes were expected (damaged or mismatched columns)")
        start = int(offsets[r] - offsets[0]) * k
        out[start:start + count, :width] = np.frombuffer(raw, np.uint8, offset=2).reshape(
            count, width)
    return (out.view("<u4").reshape(-1).astype(np.int64) - 1).astype(np.int32).reshape(n, k)


def decode_rows(token_logprobs: np.ndarray, anchor: np.ndarray, rows: list[bytes | None],
                offsets: np.ndarray, k: int) -> np.ndarray:
    """The top-k log-probabilities [N, k] float32 of format-2 rows (`encode_rows`'
    output, the ids are stored as they are). Raises CodecError for bytes that do not decode
    to k values per position."""
    tlp = np.asarray(token_logprobs, np.float32)
    n = tlp.shape[0]
    if k == 0 or n == 0:
        return np.zeros((n, k), np.float32)
    offsets = np.asarray(offsets, np.int64)
    steps = np.empty(len(rows), np.float64)
    bodies = []
    for r, raw in enumerate(rows):
        raw = raw or b""
        positions = offsets[r + 1] - offsets[r]
        if positions == 0:
            steps[r] = 1.0
            continue
        if len(raw) < 2 or raw[0] != VERSION:
            raise CodecError(f"row {r}: not top-k codes of version {VERSION} "
                             f"(header {raw[:2]!r})")
        steps[r] = 2.0 ** -raw[1]
        bodies.append(raw[2:])
    values = leb128_decode(np.frombuffer(b"".join(bodies), np.uint8))
    if values.size != n * k:
        raise CodecError(f"{values.size} codes where {n} positions x k={k} = {n * k} were "
                         "expected (damaged or mismatched columns)")
    values = values.reshape(n, k)
    finite = values > 0
    codes = np.cumsum(np.maximum(values - 1, 0), axis=1)
    step = np.repeat(steps, np.diff(offsets))
    top = (tlp + np.asarray(anchor, np.float32)).astype(np.float64)
    out = top[:, None] - codes * step[:, None]
    return np.where(finite, out, -np.inf).astype(np.float32)
