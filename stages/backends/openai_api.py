"""The `openai` teacher backend: any OpenAI-compatible server through `openai.AsyncOpenAI`.

- bounded concurrency (an asyncio semaphore), one request per prompt with `n` choices;
- retries with exponential backoff and full jitter on 429, 5xx, timeouts, dropped connections
  and malformed bodies, honouring `Retry-After`; other errors are permanent and recorded on the
  row;
- a per-request cache (SQLite, keyed by a hash of the request) so that a rerun after a crash
  never sends a request that already succeeded;
- the API key is read from the environment variable named in the config and is never written
  anywhere.

Top log-probabilities come back as token strings. vLLM's server can return ids instead
(`generate.server_token_ids: true` sends `return_tokens_as_token_ids`); otherwise the strings
are mapped to ids with the teacher's tokenizer (`generate.tokenizer`) and the mapping is checked
to round-trip. The shard facts record whether the log-probabilities are usable for KD.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import time
from pathlib import Path

import numpy as np

from pipeline.models import tokens_within
from pipeline.secrets import remember, scrub
from pipeline.registry import BACKENDS
from stages.backends.base import (BackendKind, Generation, SamplingSettings,
                                  TeacherUnavailable)

API_TOP_LOGPROBS_LIMIT = 20  # the OpenAI API's maximum for top_logprobs
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Answers that no retry or other row can change: the stage stops with one line.
_FATAL_STATUS = {401: "the server rejected the API key (401 Unauthorized)",
                 403: "the API key is not allowed to do this (403 Forbidden)",
                 404: "not found (404): the model is not served there, or the base URL is "
                      "wrong"}


class RequestCache:
    """Successful responses by request hash, in one SQLite file (safe to kill at any point).

    `seed`: another cache file read when a request is not in this one (a worker's cache on top
    of the run's merged cache, which the worker never writes)."""

    def __init__(self, path: Path, seed: Path | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT)")
        self.db.commit()
        self.seeded = False
        if seed is not None and seed.is_file():
            self.db.execute("ATTACH DATABASE ? AS seed", (f"file:{seed}?mode=ro",))
            self.seeded = True

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None and self.seeded:
            row = self.db.execute("SELECT body FROM seed.responses WHERE key = ?",
                                  (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def snapshot(self, dest: Path) -> None:
        """A consistent copy of this worker's own entries in `dest` (SQLite's backup API)."""
        dest.unlink(missing_ok=True)
        target = sqlite3.connect(dest)
        try:
            self.db.backup(target, name="main")
        finally:
            target.close()

    def put(self, key: str, body: dict) -> None:
        """Store a response; a cache that cannot be written (a full disk) stops the stage: a
        paid-for response that cannot be kept must not be taken for a failed row."""
        try:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                            (key, json.dumps(body)))
            self.db.commit()
        except sqlite3.OperationalError as e:
            raise OSError(f"the request cache cannot be written ({e})") from None


def merge_request_caches(dest: Path, sources: list[Path]) -> int:
    """Add every response of the `sources` caches to the cache `dest` (an entry already there
    is kept); returns how many entries `dest` holds after."""
    cache = RequestCache(dest)
    try:
        for source in sources:
            cache.db.execute("ATTACH DATABASE ? AS other", (f"file:{source}?mode=ro",))
            cache.db.execute("INSERT OR IGNORE INTO responses SELECT key, body FROM "
                             "other.responses")
            cache.db.commit()
            cache.db.execute("DETACH DATABASE other")
        return cache.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    finally:
        cache.db.close()


def _retry_after(error) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _is_retryable(error) -> bool:
    import openai

    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError,
                          openai.APIResponseValidationError, json.JSONDecodeError)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in _RETRYABLE_STATUS
    return False


class TokenMapper:
    """Token strings from an API -> ids of the teacher's tokenizer, or ids sent by vLLM."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.by_text: dict[str, int] = {}
        self.ambiguous: set[str] = set()
        if tokenizer is not None:
            for i in range(len(tokenizer)):
                text = tokenizer.decode([i])
                if text in self.by_text:
                    self.ambiguous.add(text)
                else:
                    self.by_text[text] = i

    def to_id(self, token: str) -> int:
        """The id of a token string; -1 when it cannot be told."""
        if token.startswith("token_id:"):
            return int(token.split(":", 1)[1])
        if token in self.ambiguous:
            return -1
        return self.by_text.get(token, -1)


def _kept(ends: np.ndarray | None, text_len: int, ids: np.ndarray, finish: str,
          tokenizer) -> int:
    """How many tokens lie wholly inside the returned text.

    Servers stop on a stop string or the end-of-sequence token but still return that last
    token's log-probabilities (vLLM does); the shard keeps only tokens before it, as the hf
    and vllm backends do. `ends` are the tokens' end offsets in the text's units when the
    response tells them; otherwise the teacher's tokenizer decides, or, with neither, a
    stopped generation loses its last token.
    """
    n = ids.shape[0]
    if ends is not None:
        return int(np.searchsorted(ends, text_len, side="right"))
    if tokenizer is not None and (ids >= 0).all():  # special tokens spelled out: EOS is cut
        return tokens_within(tokenizer, ids.tolist(), text_len)
    return n - 1 if finish == "stop" and n else n


def _generation(text: str, finish: str, kept: int, ids, lps, topk_ids, topk_lps,
                mapper: TokenMapper) -> tuple[Generation, dict]:
    """Keep the first `kept` tokens, and check them for KD.

    The check: every sampled token has its id and, with a tokenizer, the ids spell the text
    (exactly, or up to a last token that straddles the stop string). A top-k entry without a
    unique id (a string shared by several tokens, or lost to a clash) keeps id -1: its
    probability belongs with the rest of the vocabulary, which KD's "outside the top k"
    bucket holds anyway, so it is counted but does not make the row unusable.
    """
    ids, lps, topk_ids, topk_lps = ids, lps, topk_ids[:kept], topk_lps[:kept]
    check = {"tokens": kept, "sampled_unmapped": int((ids[:kept] < 0).sum()),
             "topk_unmapped": int((topk_ids < 0).sum()), "text_mismatch": 0}
    if mapper.tokenizer is not None and not check["sampled_unmapped"]:
        decoded = mapper.tokenizer.decode(ids[:kept].tolist())
        ok = decoded == text or (
            text.startswith(decoded) and kept < ids.shape[0]
            and mapper.tokenizer.decode(ids[:kept + 1].tolist()).startswith(text))
        check["text_mismatch"] = int(not ok)
        text = decoded  # the text of the kept tokens, as the hf and vllm backends write it
    return Generation(text, finish, ids[:kept], lps[:kept], topk_ids, topk_lps), check


def parse_chat_choice(choice: dict, k: int, mapper: TokenMapper) -> tuple[Generation, dict]:
    """One chat choice -> a Generation, and its KD check (see `_generation`)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    n = len(content)
    ids = np.full(n, -1, np.int32)
    lps = np.zeros(n, np.float32)
    topk_ids = np.full((n, k), -1, np.int32)
    topk_lps = np.full((n, k), -np.inf, np.float32)
    sizes = np.zeros(n, np.int64)
    for t, entry in enumerate(content):
        ids[t] = mapper.to_id(entry["token"])
        lps[t] = entry["logprob"]
        raw = entry.get("bytes")
        sizes[t] = len(raw) if raw is not None else -1
        # vLLM may return the sampled token plus k-1 others, unsorted: sort, never trust order
        tops = sorted(entry.get("top_logprobs") or [], key=lambda e: -e["logprob"])[:k]
        for j, top in enumerate(tops):
            topk_ids[t, j] = mapper.to_id(top["token"])
            topk_lps[t, j] = top["logprob"]
    text = (choice.get("message") or {}).get("content") or ""
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    ends = np.cumsum(sizes) if (sizes >= 0).all() else None  # in UTF-8 bytes
    kept = _kept(ends, len(text.encode()), ids, finish, mapper.tokenizer)
    return _generation(text, finish, kept, ids, lps, topk_ids, topk_lps, mapper)


def parse_completion_choice(choice: dict, k: int, mapper: TokenMapper
                            ) -> tuple[Generation, dict]:
    """One (legacy) completions choice -> a Generation, and its KD check.

    Here `top_logprobs[t]` is a dict keyed by token string: two tokens with the same text
    collide and one is lost, leaving an empty (-1) slot (with `server_token_ids` the keys are
    ids and cannot collide).
    """
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    n = len(tokens)
    ids = np.array([mapper.to_id(t) for t in tokens], np.int32).reshape(n)
    lps = np.array([v if v is not None else 0.0 for v in (lp.get("token_logprobs") or [])],
                   np.float32)
    if lps.shape[0] != n:
        raise ValueError(f"completions logprobs hold {n} tokens but {lps.shape[0]} values")
    topk_ids = np.full((n, k), -1, np.int32)
    topk_lps = np.full((n, k), -np.inf, np.float32)
    for t, tops in enumerate(lp.get("top_logprobs") or []):
        ranked = sorted((tops or {}).items(), key=lambda item: -item[1])[:k]
        for j, (token, value) in enumerate(ranked):
            topk_ids[t, j] = mapper.to_id(token)
            topk_lps[t, j] = value
    text = choice.get("text") or ""
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    offsets = lp.get("text_offset") or []
    ends = None
    if n and len(offsets) == n and not any(t.startswith("token_id:") for t in tokens):
        # character offsets: a token ends where the next begins; the last by its own length
        starts = np.asarray(offsets, np.int64) - offsets[0]
        ends = np.append(starts[1:], starts[-1] + len(tokens[-1]))
    kept = _kept(ends, len(text), ids, finish, mapper.tokenizer)
    return _generation(text, finish, kept, ids, lps, topk_ids, topk_lps, mapper)


class OpenAIBackend:
    """Teacher behind an OpenAI-compatible chat completions or completions endpoint."""

    name = "openai"
    whole_shards = True  # concurrency is bounded by a semaphore, not by our batches

    def __init__(self, cfg, cache_path: Path, cache_seed: Path | None = None):
        t0 = time.time()
        import openai

        if cfg.top_k > API_TOP_LOGPROBS_LIMIT:
            raise ValueError(f"generate.top_k={cfg.top_k} is above {API_TOP_LOGPROBS_LIMIT}, "
                             "the most top_logprobs an OpenAI-compatible API returns; lower it "
                             "or use the hf backend")
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        remember(key)  # scrubbed from every error text from now on
        if cfg.api_key_env and not key and not cfg.base_url:
            raise ValueError(f"environment variable {cfg.api_key_env} is not set; export the "
                             "API key there (it is never written to disk)")
        self.cfg = cfg
        # One event loop for the backend's life: the client's pooled keep-alive connections
        # belong to the loop they were opened on, so a fresh loop per shard would break them.
        self.loop = asyncio.new_event_loop()
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key or "none",
                                         max_retries=0, timeout=cfg.request_timeout)
        self.cache = RequestCache(cache_path, cache_seed)
        tokenizer = None
        if cfg.tokenizer:  # maps strings to ids, or checks the ids a server sends
            from pipeline.models import load_tokenizer, resolve_model

            tokenizer = load_tokenizer(resolve_model(cfg.tokenizer))
        self.mapper = TokenMapper(tokenizer)
        if cfg.endpoint == "chat":
            self.create, self.parse = self.client.chat.completions.create, parse_chat_choice
        else:
            self.create, self.parse = self.client.completions.create, parse_completion_choice
        self.kd_check = {"tokens": 0, "sampled_unmapped": 0, "topk_unmapped": 0,
                         "text_mismatch": 0}
        self.stats = {"requests": 0, "retries": 0, "failed": 0, "cache_hits": 0,
                      "engine_s": 0.0}  # engine_s: time spent waiting on the server
        self.startup_s = time.time() - t0

    @property
    def usable_for_kd(self) -> bool:
        """Every sampled token has its id, and the ids spell the text where that can be told."""
        c = self.kd_check
        return c["tokens"] > 0 and not c["sampled_unmapped"] and not c["text_mismatch"]

    def facts(self) -> dict:
        return {"backend": self.name, "teacher": self.cfg.model, "base_url": self.cfg.base_url,
                "endpoint": self.cfg.endpoint,
                "teacher_revision": "api:" + self.cfg.model,
                "logprob_source": "server (vLLM: raw logits; hosted APIs: undocumented)",
                "token_ids": "server" if self.cfg.server_token_ids else
                ("tokenizer:" + self.cfg.tokenizer if self.cfg.tokenizer else "none"),
                "requests": {k: v for k, v in self.stats.items() if k != "engine_s"}}

    def request_body(self, prompt: str, s: SamplingSettings, index: int = 0) -> dict:
        seed = s.seed if s.seeds is None else s.seed_of(index)
        body = {"model": self.cfg.model, "n": s.n, "temperature": s.temperature,
                "top_p": s.top_p, "max_tokens": s.max_new_tokens, "seed": seed}
        if self.cfg.endpoint == "chat":
            body.update(messages=[{"role": "user", "content": prompt}], logprobs=True,
                        top_logprobs=s.top_k)
        else:
            body.update(prompt=prompt, logprobs=s.top_k)
        if s.stop:
            body["stop"] = list(s.stop)
        if self.cfg.server_token_ids:
            body["extra_body"] = {"return_tokens_as_token_ids": True}
        return body

    async def _one(self, body: dict, semaphore: asyncio.Semaphore) -> dict | str:
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            return cached
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            async with semaphore:
                try:
                    self.stats["requests"] += 1
                    response = await self.create(**body)
                    result = response.model_dump()
                    if not result.get("choices"):
                        raise json.JSONDecodeError("response has no choices", "", 0)
                except Exception as error:  # sorted below into retryable and permanent
                    last = scrub(f"{type(error).__name__}: {error}")
                    status = getattr(error, "status_code", None)
                    if status in _FATAL_STATUS:
                        raise TeacherUnavailable(self._fatal(status, last)) from None
                    if not _is_retryable(error) or attempt == self.cfg.max_retries:
                        break
                    wait = _retry_after(error)
                else:
                    self.cache.put(key, result)
                    return result
            self.stats["retries"] += 1
            if wait is None:  # full jitter (AWS architecture blog, "Exponential Backoff")
                wait = random.uniform(0, min(self.cfg.backoff_max, 0.5 * 2 ** attempt))
            await asyncio.sleep(wait)
        self.stats["failed"] += 1
        return last

    def _fatal(self, status: int, error: str) -> str:
        where = self.cfg.base_url or "the OpenAI API"
        what = _FATAL_STATUS[status]
        if status in (401, 403):
            what += f"; check the key in ${self.cfg.api_key_env}"
        else:
            what += f" (generate.model={self.cfg.model!r}, generate.base_url={where!r})"
        return (f"the teacher at {where} cannot be used: {what}. Responses already received "
                f"are kept in the request cache. Server said: {error[:300]}")

    async def _all(self, bodies: list[dict]) -> list:
        """Every request, at most `concurrency` in flight; a fatal answer cancels the rest."""
        semaphore = asyncio.Semaphore(self.cfg.concurrency)
        tasks = [asyncio.ensure_future(self._one(b, semaphore)) for b in bodies]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def generate(self, prompts: list[str], settings: SamplingSettings) -> list:
        """One request per prompt; a prompt whose request failed for good gives a RuntimeError
        holding the last error instead of its generations."""
        bodies = [self.request_body(p, settings, i) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        results = self.loop.run_until_complete(self._all(bodies))
        self.stats["engine_s"] += time.perf_counter() - t0
        out: list = []
        for result in results:
            if isinstance(result, str):
                out.append(RuntimeError(result))
                continue
            gens = []
            for choice in sorted(result["choices"], key=lambda c: c.get("index", 0)):
                gen, check = self.parse(choice, settings.top_k, self.mapper)
                for key, value in check.items():
                    self.kd_check[key] += value
                gens.append(gen)
            out.append(gens)
        return out

    def close(self) -> None:
        """Close the client's connections and the event loop."""
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.client.close())
            self.loop.close()
        self.cache.db.close()


def wait_for_server(base_url: str, timeout: float = 120.0) -> None:
    """Block until `GET {base_url}/models` answers (for tests and benchmarks)."""
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=5):
                return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"no OpenAI-compatible server at {base_url} after "
                                   f"{timeout:.0f}s") from None
            time.sleep(1)


def _build(cfg, cache: Path | None, cache_seed: Path | None = None) -> OpenAIBackend:
    if cache is None:
        raise ValueError("the openai backend needs a path for its request cache")
    return OpenAIBackend(cfg.generate, cache, cache_seed)


def _check(g, errors: list[str]) -> None:
    if g.top_k > API_TOP_LOGPROBS_LIMIT:
        errors.append(f"generate.top_k: {g.top_k} is out of range for the openai backend, it "
                      f"must be <= {API_TOP_LOGPROBS_LIMIT} (the API's limit for top_logprobs)")
    if g.endpoint == "completions" and g.chat_template:
        errors.append("generate.chat_template: the completions endpoint sends the prompt as is; "
                      "use generate.endpoint=chat to have the server apply its chat template")


def _eval_spec(cfg) -> dict:
    """The teacher is scored through its API."""
    return {"base_url": cfg.generate.base_url, "endpoint": cfg.generate.endpoint}


BACKENDS.register(BackendKind(
    "openai", _build, reads=frozenset({"endpoint", "base_url", "server_token_ids", "tokenizer"}),
    request_cache=True, check=_check, eval_spec=_eval_spec))
