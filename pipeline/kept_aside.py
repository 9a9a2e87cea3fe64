"""What the stages keep aside instead of deleting: the output of other settings (or output
replaced by `--force`) under `<stage>/by-fingerprint/<label>/`, until `distill gc` frees it,
and files found damaged under `<stage>/quarantine/<time>/`, with a note of why, never deleted.

`KeptAside` works on one stage folder (`folder.aside`) through the folder's own file calls,
so it is the same on a local disk and on object storage.
"""

from __future__ import annotations

import posixpath
import time

from pipeline.log import log

ASIDE = "by-fingerprint"  # output of other settings, kept: `by-fingerprint/<fingerprint>/`
QUARANTINE = "quarantine"  # damaged files, moved aside (never deleted)
LOCK = "lock.json"
REQUEST_CACHE = "requests.sqlite"  # a paid-for backend's responses, keyed by the request
BATCHES = "batches"  # batch mode's request sets: input files and the records of submitted jobs
# What belongs to the stage folder itself rather than to the output of one set of settings:
# never set aside with an output, never pruned (the request cache is keyed by the request, so
# it serves every setting; a batch record must stay where a rerun finds it, or the batch it
# names would be submitted again).
FOLDER_OWN = {LOCK, ASIDE, QUARANTINE, REQUEST_CACHE, f"{REQUEST_CACHE}-wal",
              f"{REQUEST_CACHE}-shm", "requests", BATCHES}


class KeptAside:
    """The set-aside outputs and the quarantine of one stage folder."""

    def __init__(self, folder):
        self.folder = folder

    def output_names(self) -> list[str]:
        """The top-level names of the folder that belong to one settings' output (everything
        but the lock, the request cache, the set-aside outputs and the quarantine)."""
        f = self.folder
        if not f.fs.isdir(f.root):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in f.fs.ls(f.root, detail=False)]
        return sorted(n for n in names if n not in FOLDER_OWN)

    def keep(self, label: str, names: list[str] | None = None) -> str | None:
        """Move the current output (or just `names`) into `by-fingerprint/<label>/`, kept
        until the user removes it (`distill gc`); returns where it went, None when there was
        nothing to move."""
        names = self.output_names() if names is None else names
        if not names:
            return None
        label = self._unused(ASIDE, label)
        for name in names:
            self.folder.move(name, f"{ASIDE}/{label}/{name}")
        return f"{ASIDE}/{label}"

    def bring_back(self, label: str) -> bool:
        """Move an output kept aside as `label` back into place; False when there is none."""
        f = self.folder
        base = f"{ASIDE}/{label}"
        if not f.fs.isdir(f.path(base)):
            return False
        for p in f.fs.ls(f.path(base), detail=False):
            name = posixpath.basename(p.rstrip("/"))
            f.remove(name)
            f.move(f"{base}/{name}", name)
        f.remove(base)
        return True

    def quarantine(self, file: str, why: str) -> str:
        """Move a damaged file to `quarantine/` (kept for the user to look at, never deleted)
        with a note of why; returns where it went."""
        f = self.folder
        dest = f"{QUARANTINE}/{self._unused(QUARANTINE, time.strftime('%Y%m%dT%H%M%S'))}/{file}"
        f.move(file, dest)
        f.write_bytes(dest + ".why.txt", f"{why}\n".encode())
        log(f.name, f"{f.where(file)} is damaged ({why}): moved to {f.where(dest)}")
        return f.where(dest)

    def _unused(self, folder: str, label: str) -> str:
        """`label`, or `label-2`, `label-3`, ...: the first name not taken in `folder`."""
        name, n = label, 1
        while self.folder.exists(f"{folder}/{name}"):
            n += 1
            name = f"{label}-{n}"
        return name


def kept_aside(run, quarantine: bool = False) -> list[tuple[str, str, int]]:
    """What the stages of `run` keep aside: (stage, folder relative to the run, bytes) for
    every output of other settings (`<stage>/by-fingerprint/<fingerprint>/`) and, with
    `quarantine`, every quarantined file's folder."""
    out = []
    if not run.fs.isdir(run.root):
        return out
    kinds = [ASIDE] + ([QUARANTINE] if quarantine else [])
    for p in sorted(run.fs.ls(run.root, detail=False)):
        stage = posixpath.basename(p.rstrip("/"))
        for kind in kinds:
            base = posixpath.join(run.root, stage, kind)
            if not run.fs.isdir(base):
                continue
            for entry in sorted(run.fs.ls(base, detail=False)):
                name = posixpath.basename(entry.rstrip("/"))
                out.append((stage, f"{stage}/{kind}/{name}", int(run.fs.du(entry))))
    return out
