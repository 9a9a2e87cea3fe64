"""One line per event on stderr, prefixed by the stage, so it mixes well with progress bars.

Under `torchrun` / `accelerate launch` only the main process (RANK 0) speaks, so N processes
do not print every line N times."""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """False in the processes of a multi-process launch other than the first."""
    return os.environ.get("RANK", "0") == "0"


def log(stage: str, message: str) -> None:
    if is_main_process():
        print(f"[{stage}] {message}", file=sys.stderr, flush=True)
