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
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import IF_READ, NEVER, opt
from pipeline.costs import Prices, money
from pipeline.kept_aside import BATCHES
from pipeline.models import tokens_within
from pipeline.secrets import scrub
from pipeline.registry import BACKENDS
from stages.backends.base import (BackendKind, BudgetReached, Generation, NotJSONAnswer,
                                  SamplingSettings, TeacherUnavailable)
from stages.backends.openai_client import api_client
from stages.backends.request_cache import RequestCache, request_key, response_usage

API_TOP_LOGPROBS_LIMIT = 20  # the OpenAI API's maximum for top_logprobs
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Answers that no retry or other row can change: the stage stops with one line.
_FATAL_STATUS = {401: "the server rejected the API key (401 Unauthorized)",
                 403: "the API key is not allowed to do this (403 Forbidden)",
                 404: "not found (404): the model is not served there, or the base URL is "
                      "wrong"}


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
                          openai.APIResponseValidationError, json.JSONDecodeError,
                          NotJSONAnswer)):
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


def request_body_for(cfg, prompt: str, s: SamplingSettings, index: int = 0) -> dict:
    """The body of the request for one prompt (prompt `index` of its call) under the generate
    settings `cfg`: what is sent, and what its cache key is the hash of."""
    seed = s.seed if s.seeds is None else s.seed_of(index)
    body = {"model": cfg.model, "n": s.n, "temperature": s.temperature,
            "top_p": s.top_p, "max_tokens": s.max_new_tokens, "seed": seed}
    if cfg.endpoint == "chat":
        body.update(messages=[{"role": "user", "content": prompt}], logprobs=True,
                    top_logprobs=s.top_k)
    else:
        body.update(prompt=prompt, logprobs=s.top_k)
    if s.stop:
        body["stop"] = list(s.stop)
    if cfg.server_token_ids:
        body["extra_body"] = {"return_tokens_as_token_ids": True}
    return body


_BLOCKED = object()  # what a request held back by the budget returns instead of a response
_CHAT_OVERHEAD = 32  # tokens a chat template may add around one user message (a bound)


class Budget:
    """The spend cap of one backend: spent (every response in the request cache, at its
    price, and every request recorded as sent without a stored answer, at its worst case,
    across kills and reruns) plus the worst case of the requests in flight plus the worst
    case of the next one must stay within the cap, so no answer can pass it. A request's worst case: its prompt's
    tokens (the tokenizer's count, or its UTF-8 bytes, which no byte-level tokenizer exceeds)
    plus `n * max_tokens`."""

    def __init__(self, cfg, prices: Prices, totals: dict[bool, tuple[int, int]],
                 unconfirmed: dict[bool, tuple[int, int, int]] | None = None):
        self.cap, self.cap_tokens, self.prices = cfg.budget, cfg.budget_tokens, prices
        self.spent = sum(prices.cost(p, c, batch) for batch, (p, c) in totals.items())
        self.spent_tokens = sum(p + c for p, c in totals.values())
        # requests sent before (by this run, killed or timed out) without a stored answer:
        # spent at their worst case, since the provider may have billed them
        for batch, (_, p, c) in (unconfirmed or {}).items():
            self.spent += prices.cost(p, c, batch)
            self.spent_tokens += p + c
        self.reserved, self.reserved_tokens = 0.0, 0
        self.refused: tuple[float, int] | None = None  # the worst case that did not fit
        self._event: asyncio.Event | None = None  # set when a request in flight answers

    @property
    def on(self) -> bool:
        return bool(self.cap or self.cap_tokens)

    def fits(self, cost: float, tokens: int, held: bool = True) -> bool:
        """Whether a request of this worst case fits beside what is spent (and, with `held`,
        the worst cases of the requests in flight)."""
        extra, extra_tokens = (self.reserved, self.reserved_tokens) if held else (0.0, 0)
        return not ((self.cap and self.spent + extra + cost > self.cap)
                    or (self.cap_tokens and self.spent_tokens + extra_tokens + tokens
                        > self.cap_tokens))

    def reserve(self, cost: float, tokens: int) -> bool:
        """Hold a request's worst case; False (and nothing held) when it does not fit."""
        if self.refused is not None or not self.fits(cost, tokens):
            self.refused = self.refused or (cost, tokens)
            return False
        self.reserved += cost
        self.reserved_tokens += tokens
        return True

    async def admit(self, cost: float, tokens: int) -> bool:
        """`reserve`, waiting while the request would fit once the requests in flight have
        answered (their worst cases are held until then): the stage stops when the spend
        itself leaves no room, not when many requests are in flight."""
        while (self.refused is None and not self.fits(cost, tokens)
               and self.fits(cost, tokens, held=False) and self.reserved_tokens):
            await self._changed().wait()
        return self.reserve(cost, tokens)

    def _changed(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def release(self, cost: float, tokens: int) -> None:
        self.reserved -= cost
        self.reserved_tokens -= tokens
        event, self._event = self._event, None
        if event is not None:
            event.set()

    def spend(self, prompt: int, completion: int, batch: bool = False) -> None:
        self.spent += self.prices.cost(prompt, completion, batch)
        self.spent_tokens += prompt + completion

    def stopped(self, what: str) -> str:
        """The line the stage stops with."""
        cost, tokens = self.refused or (0.0, 0)
        if self.cap and self.spent + self.reserved + cost > self.cap:
            said = (f"generate.budget={money(self.cap)} is reached: {money(self.spent)} spent, "
                    f"and the next {what} could cost up to {money(cost)}")
        else:
            said = (f"generate.budget_tokens={self.cap_tokens:,} is reached: "
                    f"{self.spent_tokens:,} tokens used, and the next {what} could use up to "
                    f"{tokens:,}")
        return (f"{said}. The stage stopped before sending it: every finished shard is kept and "
                "every response received is in the request cache (generate/requests.sqlite). "
                "Raise the budget (generate.budget / generate.budget_tokens) and run the same "
                "command again to go on: no request is sent twice")


class OpenAIBackend:
    """Teacher behind an OpenAI-compatible chat completions or completions endpoint. Its batch
    transport uses it through `openai_client.PaidRequests` (cfg, cache, budget, worst_case,
    prompt_bound, usage_of)."""

    name = "openai"
    whole_shards = True  # concurrency is bounded by a semaphore, not by our batches

    def __init__(self, cfg, cache_path: Path, cache_seed: Path | None = None):
        t0 = time.time()
        if cfg.top_k > API_TOP_LOGPROBS_LIMIT:
            raise ValueError(f"generate.top_k={cfg.top_k} is above {API_TOP_LOGPROBS_LIMIT}, "
                             "the most top_logprobs an OpenAI-compatible API returns; lower it "
                             "or use the hf backend")
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key and not cfg.base_url:
            raise ValueError(f"environment variable {cfg.api_key_env} is not set; export the "
                             "API key there (it is never written to disk)")
        self.cfg = cfg
        # One event loop for the backend's life: the client's pooled keep-alive connections
        # belong to the loop they were opened on, so a fresh loop per shard would break them.
        self.loop = asyncio.new_event_loop()
        self.client = api_client(cfg, asynchronous=True)
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
        # the ledger: tokens and cost of every response a call used (sent or from the cache)
        self.prices = Prices.of(cfg)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "batch_tokens": 0,
                      "cost": 0.0, "usage_estimated": 0, "usage_by_bytes": 0}
        self.budget = Budget(cfg, self.prices, self.cache.totals(), self.cache.unconfirmed())
        self.batches = None
        if cfg.transport == "batch":
            from stages.backends.openai_batch import BatchTransport

            self.batches = BatchTransport(self, cache_path.parent / BATCHES)
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
                "requests": {k: v for k, v in self.stats.items() if k != "engine_s"},
                "transport": self.cfg.transport}

    def request_body(self, prompt: str, s: SamplingSettings, index: int = 0) -> dict:
        return request_body_for(self.cfg, prompt, s, index)

    def _prompt_tokens(self, body: dict) -> int | None:
        """The teacher's tokenizer's count of a request's prompt (None without one)."""
        if self.mapper.tokenizer is None:
            return None
        text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        return len(self.mapper.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _prompt_bytes(body: dict) -> int:
        text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        return len(text.encode())

    def prompt_bound(self, body: dict) -> int:
        """At most how many tokens the request's prompt is (see `Budget`)."""
        n = self._prompt_tokens(body)
        n = self._prompt_bytes(body) if n is None else n
        return n + (_CHAT_OVERHEAD if "messages" in body else 0)

    def worst_case(self, body: dict) -> tuple[float, int]:
        """The most a request can cost, in money and tokens."""
        prompt, completion = self.prompt_bound(body), body["n"] * body["max_tokens"]
        batch = self.batches is not None
        return self.prices.cost(prompt, completion, batch), prompt + completion

    def usage_of(self, body: dict, result: dict) -> tuple[int, int]:
        """The server's usage; without it the tokenizer's count of the prompt (its UTF-8 bytes
        / 4 without a tokenizer) and the tokens of the log-probabilities."""
        prompt, completion, estimated = response_usage(result)
        if estimated:
            self.usage["usage_estimated"] += 1
            prompt = self._prompt_tokens(body)
            if prompt is None:
                self.usage["usage_by_bytes"] += 1
                prompt = self._prompt_bytes(body) // 4
        return prompt, completion

    def _count(self, prompt: int, completion: int, batch: bool) -> None:
        self.usage["prompt_tokens"] += prompt
        self.usage["completion_tokens"] += completion
        if batch:
            self.usage["batch_tokens"] += prompt + completion
        self.usage["cost"] += self.prices.cost(prompt, completion, batch)

    async def _one(self, body: dict, semaphore: asyncio.Semaphore):
        key = request_key(body)
        cached = self.cache.get(key)
        if cached is not None:
            if self.batches is not None and key in self.batches.fresh:
                self.batches.fresh.discard(key)
                self.stats["requests"] += 1  # sent through the batch API, just now
            else:
                self.stats["cache_hits"] += 1
            used = self.cache.usage(key) or (*self.usage_of(body, cached), False)
            self._count(*used)
            return cached
        if self.batches is not None:  # batch mode never sends a request live
            return self.batches.failed.get(key, "the batch returned no answer for this request")
        last, worst = "no attempt", None
        bound = self.prompt_bound(body), body["n"] * body["max_tokens"]
        try:
            for attempt in range(self.cfg.max_retries + 1):
                async with semaphore:
                    if worst is None and self.budget.on:
                        worst = self.prices.cost(*bound, False), sum(bound)
                        if not await self.budget.admit(*worst):
                            worst = None
                            return _BLOCKED
                    sent = None
                    try:
                        self.stats["requests"] += 1
                        # write-ahead: on disk before the request leaves, open until answered
                        sent = self.cache.sending(key, *bound)
                        response = await self.create(**body)
                        if not hasattr(response, "model_dump"):  # the client's raw text
                            raise NotJSONAnswer(self._not_json(response))
                        result = response.model_dump()
                        if not result.get("choices"):
                            raise json.JSONDecodeError("response has no choices", "", 0)
                    except Exception as error:  # sorted below into retryable and permanent
                        if isinstance(error, OSError) and sent is None:
                            raise  # the record could not be written: nothing was sent
                        last = scrub(f"{type(error).__name__}: {error}")
                        status = getattr(error, "status_code", None)
                        if status is not None:  # an error answer: no provider bills it
                            self.cache.refused(sent)
                        else:  # a timeout, a lost connection, a body cut short: maybe billed
                            self.budget.spend(*bound)
                        if status in _FATAL_STATUS:
                            raise TeacherUnavailable(self._fatal(status, last)) from None
                        if not _is_retryable(error) or attempt == self.cfg.max_retries:
                            break
                        wait = _retry_after(error)
                    else:
                        used = self.usage_of(body, result)
                        self.cache.put(key, result, used, sent=sent)
                        self.budget.spend(*used)
                        self._count(*used, False)
                        return result
                self.stats["retries"] += 1
                if wait is None:  # full jitter (AWS architecture blog, "Exponential Backoff")
                    wait = random.uniform(0, min(self.cfg.backoff_max, 0.5 * 2 ** attempt))
                await asyncio.sleep(wait)
        finally:
            if worst is not None:
                self.budget.release(*worst)
        self.stats["failed"] += 1
        return last

    def _not_json(self, body) -> str:
        where = self.cfg.base_url or "the OpenAI API"
        route = "chat/completions" if self.cfg.endpoint == "chat" else "completions"
        start = " ".join(str(body).split())[:60]
        return (f"{where}/{route} answered 200 with a body that is not JSON (it starts "
                f"{start!r}): is a proxy or a gateway answering instead of the server?")

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
        if self.batches is not None:  # the batch API answers into the request cache first
            self.batches.run(bodies)
        results = self.loop.run_until_complete(self._all(bodies))
        self.stats["engine_s"] += time.perf_counter() - t0
        if any(r is _BLOCKED for r in results):
            raise BudgetReached(self.budget.stopped("request"))
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


@dataclass
class OpenAISettings:
    """The generate settings only this backend reads (`generate.<name>` in a config): joined
    into the generate section (`BackendKind.settings`); those declared `IF_READ` enter the
    generate fingerprint when this backend is chosen."""

    endpoint: str = opt("chat", "openai: `chat` (the prompt is one user message; the server "
                        "applies the chat template) or `completions` (the prompt is sent as "
                        "is, like the hf and vllm backends without chat_template).",
                        choices=["chat", "completions"], fingerprint=IF_READ)
    base_url: str | None = opt(None, "openai: the server's base URL, e.g. "
                               "http://127.0.0.1:8000/v1 (null = the OpenAI API).",
                               fingerprint=IF_READ)
    api_key_env: str = opt("OPENAI_API_KEY", "openai: the environment variable holding the API "
                           "key (the key itself is never written anywhere).", fingerprint=NEVER)
    concurrency: int = opt(16, "openai: requests in flight at once.", ge=1, le=4096,
                           fingerprint=NEVER)
    max_retries: int = opt(6, "openai: retries of a request on 429, 5xx, timeouts, dropped "
                           "connections and malformed bodies.", ge=0, le=100, fingerprint=NEVER)
    request_timeout: float = opt(120.0, "openai: seconds before a request times out.", gt=0.0,
                                 fingerprint=NEVER)
    backoff_max: float = opt(30.0, "openai: the longest wait between retries, in seconds.",
                             gt=0.0, fingerprint=NEVER)
    server_token_ids: bool = opt(False, "openai: ask the server for token ids "
                                 "(vLLM's `return_tokens_as_token_ids`).", fingerprint=IF_READ)
    tokenizer: str | None = opt(None, "openai: the teacher's tokenizer (folder or hub id), to "
                                "map token strings to ids when the server cannot send ids.",
                                fingerprint=IF_READ)
    budget: float = opt(0.0, "openai: the most the run's teacher requests may cost, at "
                        "price_input/price_output (every response in the run's request cache "
                        "counts: all rounds, earlier settings). The stage stops before a request "
                        "could pass it, keeping all it has; raise it and rerun to go on. "
                        "0 = no cap.", ge=0.0, fingerprint=NEVER)
    budget_tokens: int = opt(0, "openai: the same cap in tokens (prompt + completion); "
                             "0 = no cap.", ge=0, fingerprint=NEVER)
    transport: str = opt("live", "openai: `live` (requests sent one by one, `concurrency` in "
                         "flight) or `batch` (each shard's requests as one job of the "
                         "provider's batch API: the OpenAI Batch API costs half, answers within "
                         "batch_window).", choices=["live", "batch"],
                         fingerprint=NEVER)
    batch_window: str = opt("24h", "openai, transport=batch: the batch's completion window (the "
                            "OpenAI Batch API accepts 24h).", fingerprint=NEVER)
    batch_poll_seconds: float = opt(30.0, "openai, transport=batch: seconds between two looks at "
                                    "a running batch.", gt=0.0, fingerprint=NEVER)

    def check_settings(self, errors: list[str]) -> None:
        """Rules of these settings, whatever the backend chosen (`self` is the whole generate
        section)."""
        if not _looks_like_a_variable_name(self.api_key_env):
            # never echoed: a secret pasted where its variable's name belongs
            errors.append("generate.api_key_env: give the name of the environment variable "
                          "that holds the API key (letters, digits and _, such as "
                          "OPENAI_API_KEY), never the key itself; the value given does not "
                          "look like a variable name, so it is not shown and nothing was "
                          "written")
        api = BACKENDS.get(self.backend).request_cache
        for name, on in (("budget", self.budget), ("budget_tokens", self.budget_tokens),
                         ("transport", self.transport == "batch")):
            if on and not api:
                errors.append(f"generate.{name}: applies to an API teacher (generate.backend="
                              f"openai), not to the {self.backend} backend; a local engine's "
                              "tokens and engine-seconds are recorded in the ledger anyway")
        if self.budget and not (self.price_input or self.price_output):
            errors.append(f"generate.budget={self.budget:g} needs prices: set "
                          "generate.price_input and generate.price_output (per million "
                          "tokens), or cap tokens with generate.budget_tokens")


def _looks_like_a_variable_name(name: str | None) -> bool:
    """True for an environment variable's name (`OPENAI_API_KEY`); False for what looks like
    a secret: other characters (`sk-...`), or 20 and more letters and digits without an
    underscore."""
    if not name:
        return True  # no key at all (a local server)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
        return False
    return not (len(name) >= 20 and "_" not in name and re.search(r"\d", name))


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


def _eval_teacher(cfg, cache: Path | None) -> OpenAIBackend:
    """The teacher in eval: live requests (a held-out set should not wait on a batch window)
    and outside generate's budget (eval's responses keep their usage in eval's cache)."""
    import dataclasses

    g = dataclasses.replace(cfg.generate, transport="live", budget=0.0, budget_tokens=0)
    return _build(cfg.replace(generate=g), cache)


BACKENDS.register(BackendKind(
    "openai", _build, settings=OpenAISettings, request_cache=True, check=_check,
    eval_spec=_eval_spec, eval_teacher=_eval_teacher))
