"""Sealed folders: a folder that a library writes file by file (a training checkpoint) is
sealed once it is whole, with every file's size and sha256 in its `complete.json`, so a folder
cut short by a kill, or changed since, is told apart from a complete one, said, and removed
before anything resumes from it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable


SEAL = "complete.json"  # written into a checkpoint folder once everything in it is saved


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(folder: Path) -> None:
    """Record every file of a saved checkpoint (size and sha256) in its `complete.json`."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SEAL}
    tmp = folder / f".{SEAL}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, folder / SEAL)


def seal_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it is complete and as saved). One
    without a seal (saved before seals existed) counts when its trainer state, written last
    by the Trainer, is there and readable."""
    seal = folder / SEAL
    if not seal.is_file():
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return "its save was interrupted (no complete.json, no readable trainer_state.json)"
        return None
    try:
        files = json.loads(seal.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "its complete.json cannot be read"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"] or _digest(path) != want["sha256"]:
            return f"{name} is not as saved"
    return None


def last_complete_checkpoint(folder: Path, say: Callable[[str], None]) -> str | None:
    """The newest checkpoint under `folder` that is complete; newer ones that are not (a kill
    during a save, a damaged file) are said and removed, so the Trainer's rotation and later
    saves never meet them."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for _, path in sorted(found, reverse=True):
        why = seal_problem(path)
        if why is None:
            return str(path)
        say(f"{path.name} is incomplete ({why}): skipped and removed; resuming from the "
            "one before it")
        shutil.rmtree(path, ignore_errors=True)
    return None
