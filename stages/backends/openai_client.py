"""What the openai backend (`openai_api.py`) and its batch transport (`openai_batch.py`) share:
the SDK client for the run's server, made in one place, and the small interface through which
a transport spends the backend's money."""

from __future__ import annotations

import os
from typing import Protocol

from pipeline.secrets import remember


def api_client(cfg, asynchronous: bool = False):
    """The OpenAI SDK client for `cfg` (the generate section): the key read from the variable
    `cfg.api_key_env` names (never from a file; remembered, so that every error text is
    scrubbed of it) and no retries of the SDK's own: ours decide what may be sent again (a
    retried batch create could submit twice, a retried request could be paid twice)."""
    import openai

    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    remember(key)
    client = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return client(base_url=cfg.base_url, api_key=key or "none", max_retries=0,
                  timeout=cfg.request_timeout)


class PaidRequests(Protocol):
    """What a transport uses of the backend whose paid requests it sends: the settings, the
    request cache (answers, usage and the write-ahead record of what was sent), the budget,
    and how a request's cost is bounded and read."""

    cfg: object
    cache: object     # request_cache.RequestCache
    budget: object    # openai_api.Budget

    def worst_case(self, body: dict) -> tuple[float, int]:
        """The most a request can cost, in money and tokens."""

    def prompt_bound(self, body: dict) -> int:
        """At most how many tokens the request's prompt is."""

    def usage_of(self, body: dict, result: dict) -> tuple[int, int]:
        """The prompt and completion tokens an answer was billed for."""
