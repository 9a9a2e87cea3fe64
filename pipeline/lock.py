"""One writer per stage: a lock file with a lease, on a local disk or on object storage.

The writer of a stage creates `<stage>/lock.json` with create-if-absent (a hard link on a local
disk, a conditional PUT through fsspec) holding who it is: host, pid, the command, when it
started, and a lease that a background thread renews while the writer lives. A second writer
finds the file and refuses with a line that names the holder. A lock whose holder is gone is
stale and is broken by the next writer: on the same host when the holder's process no longer
exists, anywhere when its lease has not been renewed for `lease_s` seconds (a holder killed on
another machine). A holder that finds its lock taken over (its renewals stopped for longer than
the lease, and someone broke it) is told so by `check()` and must not commit.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid

from pipeline.log import log
from pipeline.kept_aside import LOCK
from pipeline.run_folder import RunFolderError, StageFolder
from pipeline.secrets import scrub

DEFAULT_LEASE_S = 120.0


class StageLocked(RunFolderError):
    """Another live writer holds the stage's lock."""


def lease_seconds() -> float:
    """The lease: `STEPDISTILL_LOCK_LEASE_S` (seconds) or 120."""
    try:
        return float(os.environ.get("STEPDISTILL_LOCK_LEASE_S", DEFAULT_LEASE_S))
    except ValueError:
        return DEFAULT_LEASE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def describe(holder: dict) -> str:
    started = holder.get("started", 0)
    renewed = time.time() - holder.get("renewed", started)
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started_at')} ({(time.time() - started) / 60:.0f} min ago), lease "
            f"renewed {renewed:.0f}s ago, command `{holder.get('command', '?')}`")


def stale(holder: dict, now: float | None = None) -> str | None:
    """Why a lock is stale (its holder is gone), or None while the holder may be alive."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return "its process no longer exists"
    renewed = holder.get("renewed", holder.get("started", 0))
    lease = float(holder.get("lease_s", DEFAULT_LEASE_S))
    if now - renewed > lease:
        return f"its lease ran out {now - renewed - lease:.0f}s ago"
    return None


class StageLock:
    """The lock of one stage folder, held from `acquire()` to `release()` (or a `with`)."""

    def __init__(self, folder: StageFolder, lease_s: float | None = None):
        self.folder = folder
        self.lease_s = lease_seconds() if lease_s is None else lease_s
        self.token = uuid.uuid4().hex
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "command": scrub(" ".join(os.path.basename(a) if i == 0 else a
                                             for i, a in enumerate(sys.argv)))[:300],
                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started": time.time(),
                   "lease_s": self.lease_s, "token": self.token}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def holder(self) -> dict | None:
        try:
            return self.folder.read_json(LOCK)
        except FileNotFoundError:
            return None
        except ValueError:  # being written, or damaged: judged by its age below
            return {}

    def acquire(self) -> None:
        """Take the lock, breaking a stale one; `StageLocked` names a live holder."""
        self.folder.fs.makedirs(self.folder.root, exist_ok=True)
        for _ in range(5):
            self.me["renewed"] = time.time()
            if self.folder.create_json(LOCK, self.me):
                break
            held = self.holder()
            if held is None:  # released meanwhile
                continue
            if not held:  # unreadable: give a writer in the middle of a write a moment
                time.sleep(0.5)
                held = self.holder()
                if held is None:
                    continue
            why = stale(held) if held else "it cannot be read"
            if why is None:
                raise StageLocked(
                    f"{self.folder} is being written by another process ({describe(held)}); "
                    f"refusing to write it at the same time. Wait for it to finish. If that "
                    f"process is gone (killed on another machine), its lock expires "
                    f"{held.get('lease_s', self.lease_s):.0f}s after its last renewal, or "
                    f"remove {self.folder.where(LOCK)} by hand to break it now")
            log(self.folder.name, f"breaking a stale lock ({why}): "
                f"{describe(held) if held else self.folder.where(LOCK)}")
            self.folder.remove(LOCK)
        else:
            raise StageLocked(f"could not take the lock {self.folder.where(LOCK)}: other "
                              "writers keep taking it; run one writer at a time")
        self._thread = threading.Thread(target=self._renew, name="stage-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            held = self.holder()
            if held is None or (held and held.get("token") != self.token):
                self.lost = (f"the lock {self.folder.where(LOCK)} was taken over by "
                             + (describe(held) if held else "nobody (it was removed)"))
                return
            self.me["renewed"] = time.time()
            try:
                self.folder.write_json(LOCK, self.me)
            except OSError:  # a full disk, a hiccup of the store: try again at the next beat
                pass

    def check(self) -> None:
        """Raise when the lock was lost: the writer must not commit."""
        if self.lost:
            raise StageLocked(f"{self.folder}: {self.lost} while this process was working "
                              "(its lease renewals stopped for too long); its finished shards "
                              "are kept, but it does not commit. Run the stage again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.holder()
        if held and held.get("token") == self.token:
            self.folder.remove(LOCK)
