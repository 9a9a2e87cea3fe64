"""The files of a stage that live on this machine's disk: what only a local file system can
hold (a SQLite request cache, training checkpoints, what `save_pretrained` writes), scratch
space of a worker, and the mirroring of such local folders to a run folder on object storage.

`LocalFiles` works on one stage folder (`folder.local`); on a local run folder most of it is
the folder itself, on object storage a scratch folder under the cache folder stands in and is
copied up and down.
"""

from __future__ import annotations

import hashlib
import posixpath
import shutil
from pathlib import Path

from pipeline.files import RunFolderError


class LocalFiles:
    """A stage folder's files on this machine."""

    def __init__(self, folder):
        self.folder = folder

    def path(self, name: str, what: str) -> Path:
        """A path on the local disk inside the stage folder, for `what` (a SQLite cache,
        checkpoints) that only a local file system can hold."""
        if not self.folder.run.is_local:
            raise RunFolderError(
                f"{what} needs a run folder on a local disk, and {self.folder.run} is not one; "
                "use a local --runs-dir for this stage")
        path = Path(self.folder.path(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def scratch(self, name: str) -> Path:
        """A path on this machine's disk that belongs to this stage of this run (under the
        cache folder, never in the run folder): for files a worker keeps to itself, such as
        its live SQLite request cache, which a shared or object-storage folder cannot hold."""
        from pipeline.models import cache_dir

        key = hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]
        path = cache_dir() / "scratch" / f"{self.folder.run.name}-{key}" / self.folder.name / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def download(self, file: str, dest: Path) -> bool:
        """Copy `file` from the stage folder to `dest` on the local disk; False when absent."""
        if not self.folder.exists(file):
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.folder.fs.get_file(self.folder.path(file), str(dest))
        return True

    def upload(self, src: Path, file: str) -> None:
        """Publish a local file as `file` in the stage folder, whole (see `_write_bytes`)."""
        self.folder.write_bytes(file, Path(src).read_bytes())

    def working_dir(self, name: str) -> Path:
        """A folder on this machine for files that libraries write to a local path
        (checkpoints, `save_pretrained`): inside the stage folder on a local disk; for a run
        folder on object storage, a scratch folder that `mirror_up` copies to the store."""
        if self.folder.run.is_local:
            return self.path(name, name)
        return self.scratch(name)

    def mirror_up(self, local: Path, name: str) -> None:
        """Make `name/` in the stage folder hold the files of the local folder `local`: new and
        changed files uploaded, files no longer there removed (nothing to do on a local run
        folder, where `local` is `name/` itself)."""
        if self.folder.run.is_local and Path(self.folder.path(name)) == Path(local):
            return
        remote = {posixpath.relpath(f, f"{name}"): self.folder.fs.size(self.folder.path(f))
                  for f in self.folder.files_under(name)}
        here = {p.relative_to(local).as_posix(): p for p in sorted(Path(local).rglob("*"))
                if p.is_file()}
        for rel, path in here.items():
            if remote.get(rel) != path.stat().st_size:
                self.upload(path, f"{name}/{rel}")
        for rel in set(remote) - set(here):
            self.folder.remove(f"{name}/{rel}")

    def mirror_down(self, name: str, local: Path) -> bool:
        """Copy the files of `name/` into the local folder `local` (what is there already with
        the same size is kept); False when the stage folder has no `name/`."""
        found = self.folder.files_under(name)
        for f in found:
            dest = Path(local) / posixpath.relpath(f, name)
            size = self.folder.fs.size(self.folder.path(f))
            if not (dest.is_file() and dest.stat().st_size == size):
                self.download(f, dest)
        return bool(found)

    def copy_of(self, name: str) -> Path:
        """A folder of the stage (an adapter) on this machine's disk: itself on a local run
        folder, else a fresh copy in a scratch folder."""
        if self.folder.run.is_local:
            return Path(self.folder.path(name))
        local = self.scratch(f"copy-of-{name}")
        shutil.rmtree(local, ignore_errors=True)
        if not self.mirror_down(name, local):
            raise FileNotFoundError(f"{self.folder.where(name)} does not exist")
        return local

    def publish_dir(self, built: Path, name: str) -> None:
        """Move a folder built elsewhere on the local disk (`save_pretrained`'s output) into
        place as `name`, replacing what was there."""
        if not self.folder.run.is_local:
            self.mirror_up(built, name)
            shutil.rmtree(built, ignore_errors=True)
            return
        target = self.path(name, f"the folder {name}/")
        shutil.rmtree(target, ignore_errors=True)
        built.rename(target)
