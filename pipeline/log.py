"""One line per event on stderr, prefixed by the stage, so it mixes well with progress bars."""

from __future__ import annotations

import sys


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)
