"""`distill gc`: remove what a run keeps aside, when the user asks.

A stage never deletes output: a settings change or `--force` moves the previous output to
`<stage>/by-fingerprint/<fingerprint>/` (brought back when the settings return), and a damaged
file goes to `<stage>/quarantine/`. This command lists them with their sizes and, with `--yes`,
removes them (holding each stage's lock, so no stage is being written meanwhile).

    distill gc --run demo                   # what would be freed
    distill gc --run demo --yes             # free it
    distill gc --run demo --yes --quarantine   # the quarantined files too
"""

from __future__ import annotations

import sys

from pipeline.lock import StageLock
from pipeline.run_folder import RunFolder


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def gc(run: RunFolder, yes: bool = False, quarantine: bool = False, out=sys.stdout) -> int:
    """List (and with `yes` remove) what the run keeps aside; returns the bytes freed (or that
    would be freed)."""
    found = run.kept_aside(quarantine)
    if not found:
        print(f"{run}: nothing kept aside", file=out)
        return 0
    total = sum(size for _, _, size in found)
    for _, where, size in found:
        print(f"{_size(size):>12}  {where}", file=out)
    if not yes:
        print(f"{_size(total):>12}  in all; run again with --yes to remove "
              + ("them" if quarantine else "them (--quarantine: the quarantined files too)"),
              file=out)
        return total
    for stage in sorted({stage for stage, _, _ in found}):
        folder = run.stage(stage)
        with StageLock(folder):
            for s, where, _ in found:
                if s == stage:
                    folder.remove(where[len(stage) + 1:])
    print(f"{_size(total):>12}  freed", file=out)
    return total
