"""Keys never leave the process: every error text is scrubbed before it is stored or printed.

`remember(value)` registers a secret this process holds (the API key read from the
environment); `scrub(text)` replaces every registered secret, and anything shaped like a key
(`sk-...`, `Bearer ...`, `api_key=...`, an `Authorization` header, long token-like strings
after `key`/`token`), with `[redacted]`. A server's error body that echoes the key therefore
never reaches a shard's error column, a log line or the terminal.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"
_known: set[str] = set()

# Shapes of keys and tokens: OpenAI-style (`sk-`, `sk-proj-`), other vendors' prefixes, bearer
# tokens, and `key=value` / `"api_key": "value"` pairs.
_SHAPES = [
    re.compile(r"\b(?:sk|pk|rk|ak)-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"\b(?:hf|gsk|xai|ghp|gho|github_pat|glpat|AIza)[_-]?[A-Za-z0-9_\-]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"(?i)((?:api[_-]?key|access[_-]?token|secret|password|authorization|token|key)"
               r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;}]{6,})"),
]


def remember(value: str | None) -> None:
    """Register a secret held by this process (scrubbed from every text from now on)."""
    if value and len(value) >= 4:
        _known.add(value)


def scrub(text: str) -> str:
    """`text` with every registered secret and everything shaped like a key redacted."""
    if not text:
        return text
    for value in sorted(_known, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    for i, shape in enumerate(_SHAPES):
        if i == 3:
            text = shape.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        elif i == 4:
            text = shape.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = shape.sub(REDACTED, text)
    return text
