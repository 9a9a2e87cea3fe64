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

from stages.backends import Generation, SamplingSettings

API_TOP_LOGPROBS_LIMIT = 20  # the OpenAI API's maximum for top_logprobs
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class RequestCache:
    """Successful responses by request hash, in one SQLite file (safe to kill at any point)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT)")
        self.db.commit()

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, body: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(body)))
        self.db.commit()


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


def parse_chat_choice(choice: dict, k: int, mapper: TokenMapper) -> tuple[Generation, bool]:
    """One chat choice -> a Generation, and whether its ids are trustworthy for KD."""
    content = (choice.get("logprobs") or {}).get("content") or []
    n = len(content)
    ids = np.full(n, -1, np.int32)
    lps = np.zeros(n, np.float32)
    topk_ids = np.full((n, k), -1, np.int32)
    topk_lps = np.full((n, k), -np.inf, np.float32)
    for t, entry in enumerate(content):
        ids[t] = mapper.to_id(entry["token"])
        lps[t] = entry["logprob"]
        # vLLM may return the sampled token plus k-1 others, unsorted: sort, never trust order
        tops = sorted(entry.get("top_logprobs") or [], key=lambda e: -e["logprob"])[:k]
        for j, top in enumerate(tops):
            topk_ids[t, j] = mapper.to_id(top["token"])
            topk_lps[t, j] = top["logprob"]
    text = (choice.get("message") or {}).get("content") or ""
    usable = bool(n) and (ids >= 0).all() and (topk_ids[np.isfinite(topk_lps)] >= 0).all()
    if usable and mapper.tokenizer is not None:
        usable = mapper.tokenizer.decode(ids.tolist()) == text
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    return Generation(text, finish, ids, lps, topk_ids, topk_lps), bool(usable)


class OpenAIBackend:
    """Teacher behind an OpenAI-compatible chat completions endpoint."""

    name = "openai"

    def __init__(self, cfg, cache_path: Path):
        import openai

        if cfg.top_k > API_TOP_LOGPROBS_LIMIT:
            raise ValueError(f"generate.top_k={cfg.top_k} is above {API_TOP_LOGPROBS_LIMIT}, "
                             "the most top_logprobs an OpenAI-compatible API returns; lower it "
                             "or use the hf backend")
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key and not cfg.base_url:
            raise ValueError(f"environment variable {cfg.api_key_env} is not set; export the "
                             "API key there (it is never written to disk)")
        self.cfg = cfg
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key or "none",
                                         max_retries=0, timeout=cfg.request_timeout)
        self.cache = RequestCache(cache_path)
        tokenizer = None
        if cfg.tokenizer and not cfg.server_token_ids:
            from pipeline.models import load_tokenizer, resolve_model

            tokenizer = load_tokenizer(resolve_model(cfg.tokenizer))
        self.mapper = TokenMapper(tokenizer)
        self.usable_for_kd = True
        self.stats = {"requests": 0, "retries": 0, "failed": 0, "cache_hits": 0}

    def facts(self) -> dict:
        return {"backend": self.name, "teacher": self.cfg.model, "base_url": self.cfg.base_url,
                "teacher_revision": "api:" + self.cfg.model,
                "logprob_source": "server (vLLM: raw logits; hosted APIs: undocumented)",
                "token_ids": "server" if self.cfg.server_token_ids else
                ("tokenizer:" + self.cfg.tokenizer if self.cfg.tokenizer else "none"),
                "usable_for_kd": self.usable_for_kd, "requests": dict(self.stats)}

    def request_body(self, prompt: str, s: SamplingSettings) -> dict:
        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                "n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                "max_tokens": s.max_new_tokens, "seed": s.seed, "logprobs": True,
                "top_logprobs": s.top_k}
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
                    response = await self.client.chat.completions.create(**body)
                    result = response.model_dump()
                    if not result.get("choices"):
                        raise json.JSONDecodeError("response has no choices", "", 0)
                    self.cache.put(key, result)
                    return result
                except Exception as error:  # sorted below into retryable and permanent
                    last = f"{type(error).__name__}: {error}"
                    if not _is_retryable(error) or attempt == self.cfg.max_retries:
                        break
                    wait = _retry_after(error)
            self.stats["retries"] += 1
            if wait is None:  # full jitter (AWS architecture blog, "Exponential Backoff")
                wait = random.uniform(0, min(self.cfg.backoff_max, 0.5 * 2 ** attempt))
            await asyncio.sleep(wait)
        self.stats["failed"] += 1
        return last

    async def _all(self, bodies: list[dict]) -> list:
        semaphore = asyncio.Semaphore(self.cfg.concurrency)
        return await asyncio.gather(*(self._one(b, semaphore) for b in bodies))

    def generate(self, prompts: list[str], settings: SamplingSettings) -> list:
        """One request per prompt; a failed prompt gives its error string instead of a list."""
        bodies = [self.request_body(p, settings) for p in prompts]
        results = asyncio.run(self._all(bodies))
        out: list = []
        for result in results:
            if isinstance(result, str):
                out.append(RuntimeError(result))
                continue
            gens = []
            for choice in sorted(result["choices"], key=lambda c: c.get("index", 0)):
                gen, usable = parse_chat_choice(choice, settings.top_k, self.mapper)
                self.usable_for_kd &= usable
                gens.append(gen)
            out.append(gens)
        return out


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
