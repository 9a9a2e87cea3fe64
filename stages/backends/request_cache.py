"""The request cache of API teachers: successful responses by request hash, with their usage
(what was paid for), in one SQLite file per run; shared by live and batch transports."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path


def request_key(body: dict) -> str:
    """A request's key in the cache (and its `custom_id` in a batch): the hash of its body."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def response_usage(body: dict) -> tuple[int, int, bool]:
    """(prompt tokens, completion tokens, estimated) of a response: the server's `usage`;
    without it the completion tokens are the tokens its log-probabilities list and the prompt
    tokens unknown (0, estimated)."""
    usage = body.get("usage") or {}
    if usage.get("prompt_tokens") is not None and usage.get("completion_tokens") is not None:
        return int(usage["prompt_tokens"]), int(usage["completion_tokens"]), False
    completion = 0
    for choice in body.get("choices") or []:
        lp = choice.get("logprobs") or {}
        completion += len(lp.get("content") or lp.get("tokens") or [])
    return 0, completion, True


class RequestCache:
    """Successful responses by request hash, in one SQLite file (safe to kill at any point),
    with each response's usage (prompt and completion tokens, and whether it came through a
    batch API): the run's record of what was paid for.

    `seed`: another cache file read when a request is not in this one (a worker's cache on top
    of the run's merged cache, which the worker never writes)."""

    def __init__(self, path: Path, seed: Path | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, "
                        "prompt_tokens INTEGER, completion_tokens INTEGER, batch INTEGER)")
        # the write-ahead record of spending: one row per request sent, written before it
        # leaves, with its worst case; `open` until its answer is stored (`answered`) or the
        # server answered with an error, which no provider bills (`refused`)
        self.db.execute("CREATE TABLE IF NOT EXISTS sent (id INTEGER PRIMARY KEY "
                        "AUTOINCREMENT, key TEXT, prompt_tokens INTEGER, completion_tokens "
                        "INTEGER, batch INTEGER, state TEXT)")
        self.db.commit()
        self._backfill()
        self.seeded = False
        if seed is not None and seed.is_file():
            self.db.execute("ATTACH DATABASE ? AS seed", (f"file:{seed}?mode=ro",))
            self.seeded = True

    def _backfill(self) -> None:
        """Usage rows for responses cached before usage was recorded (read from the bodies)."""
        missing = self.db.execute("SELECT key, body FROM responses WHERE key NOT IN "
                                  "(SELECT key FROM usage)").fetchall()
        for key, body in missing:
            prompt, completion, _ = response_usage(json.loads(body))
            self.db.execute("INSERT OR IGNORE INTO usage VALUES (?, ?, ?, 0)",
                            (key, prompt, completion))
        if missing:
            self.db.commit()

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None and self.seeded:
            row = self.db.execute("SELECT body FROM seed.responses WHERE key = ?",
                                  (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def usage(self, key: str) -> tuple[int, int, bool] | None:
        """(prompt tokens, completion tokens, through a batch) of a cached response."""
        for schema in ("main", "seed") if self.seeded else ("main",):
            try:
                row = self.db.execute(f"SELECT prompt_tokens, completion_tokens, batch FROM "
                                      f"{schema}.usage WHERE key = ?", (key,)).fetchone()
            except sqlite3.OperationalError:  # a seed cache from before usage was recorded
                row = None
            if row is not None:
                return int(row[0]), int(row[1]), bool(row[2])
        return None

    def totals(self) -> dict[bool, tuple[int, int]]:
        """Prompt and completion tokens of every cached response, live (False) and batch
        (True): what the run has paid for."""
        out = {False: (0, 0), True: (0, 0)}
        schemas = ["main"] + (["seed"] if self.seeded else [])
        query = " UNION ".join(f"SELECT key, prompt_tokens, completion_tokens, batch FROM "
                               f"{s}.usage" for s in schemas)
        try:
            rows = self.db.execute(f"SELECT batch, SUM(prompt_tokens), SUM(completion_tokens) "
                                   f"FROM ({query}) GROUP BY batch").fetchall()
        except sqlite3.OperationalError:  # a seed cache from before usage was recorded
            rows = self.db.execute("SELECT batch, SUM(prompt_tokens), SUM(completion_tokens) "
                                   "FROM main.usage GROUP BY batch").fetchall()
        for batch, prompt, completion in rows:
            out[bool(batch)] = (int(prompt or 0), int(completion or 0))
        return out

    def sending(self, key: str, prompt: int, completion: int, batch: bool = False) -> int:
        """Record a request about to leave with its worst case (durable before it is sent:
        a kill after the server billed it still finds it); returns the record's id."""
        try:
            cursor = self.db.execute("INSERT INTO sent (key, prompt_tokens, completion_tokens, "
                                     "batch, state) VALUES (?, ?, ?, ?, 'open')",
                                     (key, prompt, completion, int(batch)))
            self.db.commit()
        except sqlite3.OperationalError as e:
            raise OSError(f"the request cache cannot be written ({e})") from None
        return int(cursor.lastrowid)

    def settle(self, key: str, state: str) -> None:
        """Close the open batch records of `key`: `answered` (its answer stored) or `refused`
        (the batch failed or expired it: not billed)."""
        self.db.execute("UPDATE sent SET state = ? WHERE key = ? AND batch = 1 AND "
                        "state = 'open'", (state, key))
        self.db.commit()

    def sending_many(self, rows: list[tuple[str, int, int]], batch: bool = True) -> None:
        """`sending` for a whole request set in one transaction (a batch about to be made)."""
        try:
            self.db.executemany("INSERT INTO sent (key, prompt_tokens, completion_tokens, "
                                "batch, state) VALUES (?, ?, ?, ?, 'open')",
                                [(k, p, c, int(batch)) for k, p, c in rows])
            self.db.commit()
        except sqlite3.OperationalError as e:
            raise OSError(f"the request cache cannot be written ({e})") from None

    def refused(self, sent: int) -> None:
        """The server answered the request with an error status: nothing was billed."""
        self.db.execute("UPDATE sent SET state = 'refused' WHERE id = ?", (sent,))
        self.db.commit()

    def unconfirmed(self) -> dict[bool, tuple[int, int, int]]:
        """Requests sent without an answer stored or an error received (a kill, a timeout, a
        connection lost), live (False) and batch (True): (requests, worst-case prompt tokens,
        worst-case completion tokens). The provider may have billed each."""
        out = {False: (0, 0, 0), True: (0, 0, 0)}
        for batch, n, prompt, completion in self.db.execute(
                "SELECT batch, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM sent "
                "WHERE state = 'open' GROUP BY batch"):
            out[bool(batch)] = (int(n), int(prompt or 0), int(completion or 0))
        return out

    def snapshot(self, dest: Path) -> None:
        """A consistent copy of this worker's own entries in `dest` (SQLite's backup API)."""
        dest.unlink(missing_ok=True)
        target = sqlite3.connect(dest)
        try:
            self.db.backup(target, name="main")
        finally:
            target.close()

    def put(self, key: str, body: dict, usage: tuple[int, int] | None = None,
            batch: bool = False, sent: int | None = None) -> None:
        """Store a response and its usage (default: read from the body), closing its record
        `sent` (`sending`) in the same transaction; a cache that cannot be written (a full
        disk) stops the stage: a paid-for response that cannot be kept must not be taken for
        a failed row."""
        prompt, completion = usage if usage is not None else response_usage(body)[:2]
        try:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                            (key, json.dumps(body)))
            self.db.execute("INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?)",
                            (key, prompt, completion, int(batch)))
            if sent is not None:
                self.db.execute("UPDATE sent SET state = 'answered' WHERE id = ?", (sent,))
            self.db.commit()
        except sqlite3.OperationalError as e:
            raise OSError(f"the request cache cannot be written ({e})") from None


def merge_request_caches(dest: Path, sources: list[Path]) -> int:
    """Add every response (and its usage) of the `sources` caches to the cache `dest` (an
    entry already there is kept); returns how many entries `dest` holds after."""
    cache = RequestCache(dest)
    try:
        for source in sources:
            cache.db.execute("ATTACH DATABASE ? AS other", (f"file:{source}?mode=ro",))
            cache.db.execute("INSERT OR IGNORE INTO responses SELECT key, body FROM "
                             "other.responses")
            has_usage = cache.db.execute("SELECT 1 FROM other.sqlite_master WHERE "
                                         "type = 'table' AND name = 'usage'").fetchone()
            if has_usage:
                cache.db.execute("INSERT OR IGNORE INTO usage SELECT key, prompt_tokens, "
                                 "completion_tokens, batch FROM other.usage")
            has_sent = cache.db.execute("SELECT 1 FROM other.sqlite_master WHERE "
                                        "type = 'table' AND name = 'sent'").fetchone()
            if has_sent:  # a worker's requests sent without an answer stay counted
                cache.db.execute("INSERT INTO sent (key, prompt_tokens, completion_tokens, "
                                 "batch, state) SELECT key, prompt_tokens, completion_tokens, "
                                 "batch, state FROM other.sent WHERE state = 'open'")
            cache.db.commit()
            cache.db.execute("DETACH DATABASE other")
        cache._backfill()
        return cache.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    finally:
        cache.db.close()
