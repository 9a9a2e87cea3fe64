"""Fingerprints: what decides a stage's output, as a short stable hash.

A stage's fingerprint hashes its own settings and what it depends on upstream; a downstream
stage depends on an upstream one through `manifest_digest` (its fingerprint and the checksum of
every file it wrote), so any change above redoes what is below, and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT_VERSION = 1


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def manifest_digest(manifest: dict) -> str:
    """What a downstream stage depends on: the fingerprint and every output file's checksum."""
    files = sorted((s["file"], s["sha256"]) for s in manifest.get("files", []))
    return fingerprint(manifest["fingerprint"], files)


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
