"""One line per event on stderr, prefixed by the stage, so it mixes well with progress bars.

Lines go through the `logging` module (logger `stepdistill`): `distill <command> -q` keeps
only warnings and errors (and hides progress bars), `-v` adds debug lines and the libraries'
own info. Under `torchrun` / `accelerate launch` only the main process (RANK 0) speaks, so N
processes do not print every line N times. Results (tables, the config) go to stdout with
`print`, whatever the verbosity.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = logging.getLogger("stepdistill")


class _Stderr(logging.Handler):
    """Writes to the `sys.stderr` of the moment (a test's captured one included)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


class _StageFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = getattr(record, "stage", "")
        return f"[{stage}] {record.getMessage()}" if stage else record.getMessage()


VERBOSITY = "STEPDISTILL_VERBOSITY"  # passed on to the stages' child processes


def _level(verbosity: int) -> int:
    return {-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(1, verbosity)),
                                                       logging.DEBUG)


if not LOGGER.handlers:
    _handler = _Stderr()
    _handler.setFormatter(_StageFormat())
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(_level(int(os.environ.get(VERBOSITY, "0") or 0)))
    LOGGER.propagate = False


def set_verbosity(level: int) -> None:
    """-1 quiet (warnings and errors, no progress bars), 0 normal, 1 verbose (debug lines,
    the libraries' info); child processes started afterwards inherit it."""
    LOGGER.setLevel(_level(level))
    os.environ[VERBOSITY] = str(level)
    if level < 0:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads its defaults from TQDM_* variables
    elif os.environ.get("TQDM_DISABLE") == "1":
        os.environ.pop("TQDM_DISABLE")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.ERROR if level < 0 else
                                 logging.INFO if level > 0 else logging.WARNING)
        if level < 0:  # transformers' own bars (loading and writing weights)
            hf_logging.disable_progress_bar()
        else:
            hf_logging.enable_progress_bar()
    except ImportError:
        pass


def quiet() -> bool:
    """Whether `-q` asked for warnings and errors only (progress bars off too)."""
    return LOGGER.level > logging.INFO


def is_main_process() -> bool:
    """False in the processes of a multi-process launch other than the first."""
    return os.environ.get("RANK", "0") == "0"


def log(stage: str, message: str, level: int = logging.INFO) -> None:
    """A line `[stage] message` (no prefix for an empty stage), from the main process."""
    if is_main_process():
        LOGGER.log(level, message, extra={"stage": stage})


def debug(stage: str, message: str) -> None:
    log(stage, message, logging.DEBUG)

