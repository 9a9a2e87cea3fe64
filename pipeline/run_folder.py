"""The run folder: the one module that reads and writes a run's files.

A run folder holds one folder per stage (`generate/`, `filter/`, `train/`, `train-<name>/`,
`eval/`) and the run's `config.yaml`. Everything in it is reached through fsspec, so the folder
may be a local path or any fsspec URL; the few things that must live on a local disk (the
SQLite request cache, training checkpoints, the adapter that `save_pretrained` writes) ask for
a `local_path`, which says so clearly on any other file system.

Writes never leave a lie on disk: on a local disk every file is written to a temporary name in
its folder, synced and renamed into place; on object storage, where there is no rename, a file
goes straight to its final key (an object appears whole or not at all). A stage's manifest is
written last, so its existence means the stage finished, and its fingerprint says with which
settings and on which input. Logs are rewritten whole, never appended to, which object storage
cannot do.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fingerprints import FORMAT_VERSION, changed_keys
from pipeline.log import log

META_KEY = b"stepdistill"
MANIFEST = "manifest.json"
PLAN = "plan.json"


class RunFolderError(RuntimeError):
    """A run folder cannot do what was asked of it (the message says why and what to do)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunFolder:
    """One run's folder: a local path or an fsspec URL (`s3://bucket/runs/demo`)."""

    def __init__(self, location: str | os.PathLike):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = os.fspath(location)
        # Object stores: no listing cache, as other processes (workers) write the same folder.
        # A fresh client each time: its endpoint and credentials come from the environment.
        options = {} if "://" not in self.url or self.url.startswith("file://") else {
            "use_listings_cache": False, "skip_instance_cache": True}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as e:  # e.g. s3:// without s3fs
            raise RunFolderError(f"cannot open the run folder {self.url}: {e} (for S3: pip "
                                 "install 'stepdistill[s3]')") from None
        except ValueError as e:  # an unknown protocol
            raise RunFolderError(f"cannot open the run folder {self.url}: {e}") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)

    @classmethod
    def at(cls, runs_dir: str | os.PathLike, run: str) -> "RunFolder":
        """The folder of run `run` under `runs_dir` (a path or a URL)."""
        base = os.fspath(runs_dir)
        return cls(f"{base.rstrip('/')}/{run}" if "://" in base else Path(base) / run)

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.rstrip("/"))

    def __str__(self) -> str:
        return self.url

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def stage(self, name: str) -> "StageFolder":
        return StageFolder(self, name)

    def stage_names(self, prefix: str) -> list[str]:
        """The stage folders called `prefix` or `prefix-<something>`, sorted."""
        if not self.fs.isdir(self.root):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)
                 if self.fs.isdir(p)]
        return sorted(n for n in names if n == prefix or n.startswith(prefix + "-"))

    def student(self, name: str = "") -> "StageFolder":
        """The train stage folder of a student: `train/`, or `train-<name>/` for a named one
        (`train.name`), so students trained on the same traces sit side by side."""
        return self.stage(f"train-{name}" if name else "train")

    def students(self) -> list[str]:
        """The names of the students with a train folder ('' for `train/`), sorted."""
        return [n[len("train-"):] if n != "train" else "" for n in self.stage_names("train")]

    def write_text(self, name: str, text: str) -> None:
        _write_bytes(self.fs, self.is_local, self.path(name), text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, _json(obj))

    def read_json(self, name: str) -> Any:
        with self.fs.open(self.path(name), "rb") as f:
            return json.loads(f.read())


class StageFolder:
    """One stage's folder inside a run: its shards, manifest, plan, reports and logs."""

    def __init__(self, run: RunFolder, name: str):
        self.run, self.name = run, name
        self.fs = run.fs
        self.root = run.path(name)

    def __str__(self) -> str:
        return f"{self.run.url.rstrip('/')}/{self.name}"

    def path(self, file: str) -> str:
        return posixpath.join(self.root, file)

    def where(self, file: str) -> str:
        """A file's location as the user should read it in a message."""
        return f"{self}/{file}"

    def exists(self, file: str | None = None) -> bool:
        return self.fs.exists(self.path(file) if file else self.root)

    def files(self, suffix: str = "") -> list[str]:
        """The names of the plain files in the folder (not in sub-folders) ending in `suffix`."""
        if not self.fs.isdir(self.root):
            return []
        return sorted(posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)
                      if p.endswith(suffix) and self.fs.isfile(p))

    def files_under(self, folder: str, suffix: str = "") -> list[str]:
        """The files in a sub-folder ending in `suffix`, as paths relative to the stage."""
        base = self.path(folder)
        if not self.fs.isdir(base):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(base)
                      if p.endswith(suffix))

    def remove(self, file: str) -> None:
        if self.fs.exists(self.path(file)):
            self.fs.rm(self.path(file), recursive=True)

    def clear(self) -> None:
        """Delete everything the stage holds (its previous output)."""
        if self.fs.isdir(self.root):
            for p in self.fs.ls(self.root, detail=False):
                self.fs.rm(p, recursive=True)
        self.fs.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------------ manifest and plan

    def manifest(self) -> dict | None:
        """The finished stage's manifest, or None (not finished, or unreadable)."""
        try:
            return self.read_json(MANIFEST)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, manifest: dict) -> None:
        """Write the manifest, last: from now on the stage counts as finished."""
        self.write_json(MANIFEST, {"format_version": FORMAT_VERSION, "finished_at": _now(),
                                   **manifest})

    def drop_manifest(self) -> None:
        self.remove(MANIFEST)

    def plan(self) -> dict | None:
        """The plan the stage's work started from (fingerprint, settings, shards), or None."""
        try:
            return self.read_json(PLAN)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def claim_plan(self, plan: dict) -> dict:
        """Write `plan` unless a plan is there already (create-if-absent, so of many workers
        starting at once exactly one writes it); return the plan in force."""
        self.fs.makedirs(self.root, exist_ok=True)
        if self.create_json(PLAN, {**plan, "started_at": _now()}):
            return self.plan()
        found = self.plan()
        if found is None:
            raise RunFolderError(f"{self.where(PLAN)} exists but cannot be read; move it aside "
                                 "and start the workers again")
        return found

    def begin(self, fingerprint: str, settings: dict, force: bool = False,
              shards: list[dict] | None = None) -> dict | None:
        """Make the folder hold only work done with `fingerprint`.

        Returns the existing manifest when it was made with `fingerprint` (the caller checks
        that its files are intact and its input unchanged), else None. Output made with other
        settings is deleted, and the keys that changed are said.
        """
        self.fs.makedirs(self.root, exist_ok=True)
        manifest = self.manifest()
        plan = self.plan()
        previous = manifest or plan
        if force and previous is not None:
            log(self.name, "--force: discarding the previous output")
        elif previous is not None and previous.get("fingerprint") != fingerprint:
            diff = changed_keys(previous.get("settings", {}), settings)
            why = "; ".join(diff) if diff else "its input changed"
            log(self.name, f"settings or input changed since the last run ({why}): redoing "
                "the stage")
        elif previous is not None:
            return manifest
        self.clear()
        self.write_json(PLAN, {"fingerprint": fingerprint, "settings": settings,
                               **({"shards": shards} if shards is not None else {}),
                               "started_at": _now()})
        return None

    def intact(self, manifest: dict) -> bool:
        """Every file the manifest lists is there with its size."""
        for entry in manifest.get("files", []):
            path = self.path(entry["file"])
            if not self.fs.isfile(path) or self.fs.size(path) != entry["bytes"]:
                return False
        return True

    # ------------------------------------------------------------------ shards

    def write_table(self, file: str, table: pa.Table, meta: dict) -> dict:
        """Write `table` as Parquet with `meta` in its metadata, atomically.

        Returns the file's manifest entry: name, rows, bytes and sha256.
        """
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(schema_meta), sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        _write_bytes(self.fs, self.run.is_local, self.path(file), data)
        return {"file": file, "rows": table.num_rows, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def read_table(self, file: str, columns: list[str] | None = None) -> pa.Table:
        if self.run.is_local:
            return pq.read_table(self.path(file), columns=columns)
        with self.fs.open(self.path(file), "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_tables(self, files: list[str], columns: list[str] | None = None) -> pa.Table:
        tables = [self.read_table(f, columns) for f in files]
        if not tables:
            raise FileNotFoundError(f"no shards listed for {self}")
        return pa.concat_tables(tables, promote_options="default")

    def table_meta(self, file: str) -> dict | None:
        """The metadata `write_table` stored, or None for a missing, foreign or unreadable
        file."""
        path = self.path(file)
        try:
            if self.run.is_local:
                schema = pq.read_schema(path)
            else:
                with self.fs.open(path, "rb") as f:
                    schema = pq.read_schema(f)
        except (OSError, pa.ArrowInvalid):
            return None
        raw = (schema.metadata or {}).get(META_KEY)
        return json.loads(raw) if raw else None

    def entry(self, file: str) -> dict:
        """A file's manifest entry (rows for Parquet files), read from the folder."""
        path = self.path(file)
        out = {"file": file}
        if file.endswith(".parquet"):
            if self.run.is_local:
                out["rows"] = pq.ParquetFile(path).metadata.num_rows
            else:
                with self.fs.open(path, "rb") as f:
                    out["rows"] = pq.ParquetFile(f).metadata.num_rows
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.update(bytes=self.fs.size(path), sha256=h.hexdigest())
        return out

    def entries_under(self, folder: str) -> list[dict]:
        """Manifest entries of every file in a sub-folder (paths relative to the stage)."""
        base = self.path(folder)
        found = sorted(p for p in self.fs.find(base) if self.fs.isfile(p))
        return [self.entry(posixpath.relpath(p, self.root)) for p in found]

    # ------------------------------------------------------------------ reports and logs

    def write_bytes(self, file: str, data: bytes) -> None:
        _write_bytes(self.fs, self.run.is_local, self.path(file), data)

    def write_json(self, file: str, obj: Any) -> None:
        self.write_bytes(file, _json(obj).encode())

    def create_json(self, file: str, obj: Any) -> bool:
        """Write `obj` only if `file` does not exist yet; returns whether this call wrote it."""
        return _write_bytes(self.fs, self.run.is_local, self.path(file), _json(obj).encode(),
                            exclusive=True)

    def read_json(self, file: str) -> Any:
        with self.fs.open(self.path(file), "rb") as f:
            return json.loads(f.read())

    def write_jsonl(self, file: str, records: list[dict]) -> None:
        """Write a whole JSON-lines log (rewritten, never appended: object stores cannot)."""
        self.write_bytes(file, "".join(json.dumps(r, default=str) + "\n"
                                       for r in records).encode())

    def read_jsonl(self, file: str) -> list[dict]:
        """The records of a JSON-lines log; a last line cut short by a crash is left out."""
        if not self.exists(file):
            return []
        with self.fs.open(self.path(file), "rb") as f:
            lines = f.read().decode().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    # ------------------------------------------------------------------ local-only things

    def local_path(self, name: str, what: str) -> Path:
        """A path on the local disk inside the stage folder, for `what` (a SQLite cache,
        checkpoints) that only a local file system can hold."""
        if not self.run.is_local:
            raise RunFolderError(
                f"{what} needs a run folder on a local disk, and {self.run} is not one; use a "
                "local --runs-dir for this stage")
        path = Path(self.path(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def scratch(self, name: str) -> Path:
        """A path on this machine's disk that belongs to this stage of this run (under the
        cache folder, never in the run folder): for files a worker keeps to itself, such as
        its live SQLite request cache, which a shared or object-storage folder cannot hold."""
        from pipeline.models import cache_dir

        key = hashlib.sha256(str(self).encode()).hexdigest()[:16]
        path = cache_dir() / "scratch" / f"{self.run.name}-{key}" / self.name / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def download(self, file: str, dest: Path) -> bool:
        """Copy `file` from the stage folder to `dest` on the local disk; False when absent."""
        if not self.exists(file):
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path(file), str(dest))
        return True

    def upload(self, src: Path, file: str) -> None:
        """Publish a local file as `file` in the stage folder, whole (see `_write_bytes`)."""
        self.write_bytes(file, Path(src).read_bytes())

    def working_dir(self, name: str) -> Path:
        """A folder on this machine for files that libraries write to a local path
        (checkpoints, `save_pretrained`): inside the stage folder on a local disk; for a run
        folder on object storage, a scratch folder that `mirror_up` copies to the store."""
        if self.run.is_local:
            return self.local_path(name, name)
        return self.scratch(name)

    def mirror_up(self, local: Path, name: str) -> None:
        """Make `name/` in the stage folder hold the files of the local folder `local`: new and
        changed files uploaded, files no longer there removed (nothing to do on a local run
        folder, where `local` is `name/` itself)."""
        if self.run.is_local and Path(self.path(name)) == Path(local):
            return
        remote = {posixpath.relpath(f, f"{name}"): self.fs.size(self.path(f))
                  for f in self.files_under(name)}
        here = {p.relative_to(local).as_posix(): p for p in sorted(Path(local).rglob("*"))
                if p.is_file()}
        for rel, path in here.items():
            if remote.get(rel) != path.stat().st_size:
                self.upload(path, f"{name}/{rel}")
        for rel in set(remote) - set(here):
            self.remove(f"{name}/{rel}")

    def mirror_down(self, name: str, local: Path) -> bool:
        """Copy the files of `name/` into the local folder `local` (what is there already with
        the same size is kept); False when the stage folder has no `name/`."""
        found = self.files_under(name)
        for f in found:
            dest = Path(local) / posixpath.relpath(f, name)
            if not (dest.is_file() and dest.stat().st_size == self.fs.size(self.path(f))):
                self.download(f, dest)
        return bool(found)

    def local_copy(self, name: str) -> Path:
        """A folder of the stage (an adapter) on this machine's disk: itself on a local run
        folder, else a fresh copy in a scratch folder."""
        if self.run.is_local:
            return Path(self.path(name))
        local = self.scratch(f"copy-of-{name}")
        shutil.rmtree(local, ignore_errors=True)
        if not self.mirror_down(name, local):
            raise FileNotFoundError(f"{self.where(name)} does not exist")
        return local

    def publish_dir(self, built: Path, name: str) -> None:
        """Move a folder built elsewhere on the local disk (`save_pretrained`'s output) into
        place as `name`, replacing what was there."""
        if not self.run.is_local:
            self.mirror_up(built, name)
            shutil.rmtree(built, ignore_errors=True)
            return
        target = self.local_path(name, f"the folder {name}/")
        shutil.rmtree(target, ignore_errors=True)
        built.rename(target)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def _write_bytes(fs, is_local: bool, path: str, data: bytes, exclusive: bool = False) -> bool:
    """Write a whole file: on a local disk through a synced temporary file and a rename, on
    object storage straight to its key. `exclusive`: only when no file is there yet
    (create-if-absent: a hard link on a local disk, a conditional PUT on S3); returns whether
    this call wrote it."""
    parent = posixpath.dirname(path)
    if not is_local:
        fs.makedirs(parent, exist_ok=True)
        if not exclusive:
            fs.pipe_file(path, data)
            return True
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a store with no create-if-absent
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
        return True
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{posixpath.basename(path)}.", suffix=".tmp",
                               dir=parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are for the user to share
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails when the file exists: the first writer wins, whole
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def as_run_folder(run: "RunFolder | str | os.PathLike") -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder(run)

