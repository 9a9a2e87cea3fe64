"""The run folder: reading and writing a run's files goes through it.

A run folder holds one folder per stage (`generate/`, `filter/`, `train/`, `train-<name>/`,
`eval/`) and the run's `config.yaml`. Everything in it is reached through fsspec, so the folder
may be a local path or any fsspec URL. A stage folder's concerns each have a short module of
their own: files written whole and checked (`pipeline.files`), what is kept aside and
quarantined (`pipeline.kept_aside`, as `folder.aside`), and the files that must live on this
machine's disk, mirrored to object storage (`pipeline.local_files`, as `folder.local`); this
module holds the folders themselves, their manifests, plans and checked reads.

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
import time
from pathlib import Path
from typing import Any, Callable, Union

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import files
from pipeline.files import RunFolderError, mismatch, parquet_options, sha256_of, to_json
from pipeline.fingerprints import FORMAT_VERSION, changed_keys
from pipeline.kept_aside import ASIDE, KeptAside, kept_aside
from pipeline.local_files import LocalFiles
from pipeline.log import log

META_KEY = b"stepdistill"
MANIFEST = "manifest.json"
PLAN = "plan.json"
RECORDS = "done"  # one record per finished shard: `done/<shard>.json`, written after its files


Columns = Union[list[str], Callable[[pa.Schema], list[str]], None]


class DamagedFile(RunFolderError):
    """A file does not match what its manifest recorded (size, sha256 or rows)."""

    def __init__(self, where: str, why: str, then: str = ""):
        self.where, self.why = where, why
        super().__init__(f"{where} is damaged: {why}" + (f". {then}" if then else ""))


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

    def kept_aside(self, quarantine: bool = False) -> list[tuple[str, str, int]]:
        """What the stages keep aside (`pipeline.kept_aside.kept_aside`)."""
        return kept_aside(self, quarantine)

    def write_text(self, name: str, text: str) -> None:
        files.write_whole(self.fs, self.is_local, self.path(name), text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        files.write_whole(self.fs, self.is_local, self.path(name), data)

    def where(self, name: str) -> str:
        """A file's location as the user should read it in a message."""
        return f"{self.url.rstrip('/')}/{name}"

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, to_json(obj))

    def read_json(self, name: str) -> Any:
        with self.fs.open(self.path(name), "rb") as f:
            return json.loads(f.read())


class StageFolder:
    """One stage's folder inside a run: its shards, manifest, plan, reports and logs (and, as
    `aside` and `local`, what it keeps aside and its files on this machine)."""

    def __init__(self, run: RunFolder, name: str):
        self.run, self.name = run, name
        self.fs = run.fs
        self.root = run.path(name)
        self.aside = KeptAside(self)    # other settings' output and damaged files, kept
        self.local = LocalFiles(self)   # what must live on this machine's disk

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

    def move(self, src: str, dest: str) -> None:
        """Move a file or folder inside the stage folder (a rename on a local disk)."""
        self.fs.makedirs(posixpath.dirname(self.path(dest)), exist_ok=True)
        if self.run.is_local:
            os.replace(self.path(src), self.path(dest))
            return
        # object storage: a folder is its keys; each is copied server-side, then removed
        source = self.path(src)
        keys = self.fs.find(source) if self.fs.isdir(source) else [source]
        for key in keys:
            self.fs.copy(key, self.path(dest) + key[len(source):])
        for key in keys:
            self.fs.rm_file(key)

    def clean_temporary(self) -> int:
        """Remove the temporary files of writers that died before renaming them into place
        (only called by the stage's lock holder); returns how many were removed."""
        if not self.run.is_local or not os.path.isdir(self.root):
            return 0
        found = [p for p in Path(self.root).rglob(".*.tmp") if p.is_file()
                 and ASIDE not in p.relative_to(self.root).parts]
        for p in found:
            p.unlink(missing_ok=True)
        if found:
            log(self.name, f"removed {len(found)} temporary file(s) left by a writer that "
                "stopped before finishing them")
        return len(found)

    # ------------------------------------------------------------------ manifest and plan

    def manifest(self) -> dict | None:
        """The finished stage's manifest, or None (not finished, or unreadable)."""
        try:
            return self.read_json(MANIFEST)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, manifest: dict) -> dict:
        """Write the manifest, last: from now on the stage counts as finished. Returns it as
        written."""
        written = {"format_version": FORMAT_VERSION, "finished_at": _now(), **manifest}
        self.write_json(MANIFEST, written)
        return written

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
        """Make the folder hold the work done with `fingerprint`, keeping every other output.

        Returns the existing manifest when it was made with `fingerprint` (the caller checks
        that its files are intact and its input unchanged), else None. Output made with other
        settings is moved to `by-fingerprint/<its fingerprint>/` (the keys that changed are
        said), and output made with `fingerprint` before is brought back from there; with
        `force` the current output is set aside too. Nothing is deleted.
        """
        self.fs.makedirs(self.root, exist_ok=True)
        manifest = self.manifest()
        plan = self.plan()
        previous = manifest or plan
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if previous is None:
            moved = self.aside.keep(f"unknown-{stamp}")
            if moved:
                log(self.name, f"files of an unknown earlier run are kept in {self.where(moved)}")
        elif force:
            moved = self.aside.keep(f"{previous.get('fingerprint')}-replaced-{stamp}")
            log(self.name, "--force: redoing the stage; the previous output is kept in "
                f"{self.where(moved or ASIDE)} (`distill gc` removes it)")
        elif previous.get("fingerprint") != fingerprint:
            diff = changed_keys(previous.get("settings", {}), settings)
            why = "; ".join(diff) if diff else "its input changed"
            moved = self.aside.keep(str(previous.get("fingerprint")))
            log(self.name, f"settings changed since the last run ({why}); the previous output "
                f"is kept in {self.where(moved or ASIDE)}")
            if self.aside.bring_back(fingerprint):
                log(self.name, f"output made with these settings before (fingerprint "
                    f"{fingerprint}) is back in place: only what it lacks is done")
                manifest = self.manifest()
                if manifest is not None and manifest.get("fingerprint") == fingerprint:
                    return manifest
        else:
            return manifest
        self.write_json(PLAN, {"fingerprint": fingerprint, "settings": settings,
                               **({"shards": shards} if shards is not None else {}),
                               "started_at": _now()})
        return None

    def intact(self, manifest: dict) -> bool:
        """Every file the manifest lists is there with its size and sha256 (read-only)."""
        return not self.problems(manifest.get("files", []))

    def problem(self, entry: dict) -> str | None:
        """What is wrong with a file against its manifest entry (missing, size, sha256), or
        None when it is as recorded."""
        path = self.path(entry["file"])
        if not self.fs.isfile(path):
            return "missing"
        return mismatch(entry, self.fs.size(path), lambda: sha256_of(self.fs, path))

    def problems(self, entries: list[dict], quarantine: bool = False) -> dict[str, str]:
        """What is wrong with each file of `entries` that is not as recorded ({file: why});
        `quarantine`: files there but damaged are moved to `quarantine/` on the way."""
        out = {}
        for entry in entries:
            why = self.problem(entry)
            if why is not None:
                out[entry["file"]] = why
                if quarantine and why != "missing":
                    self.aside.quarantine(entry["file"], why)
        return out

    # ------------------------------------------------------------------ shards

    def write_table(self, file: str, table: pa.Table, meta: dict) -> dict:
        """Write `table` as Parquet with `meta` in its metadata, atomically (an empty table
        as a file with its schema and no row group, which every Parquet reader takes).

        Returns the file's manifest entry: name, rows, bytes and sha256.
        """
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
        sink = pa.BufferOutputStream()
        table = table.replace_schema_metadata(schema_meta)
        if table.num_rows:
            pq.write_table(table, sink, **parquet_options(table))
        else:  # no row group at all: readers such as `datasets` fail on a row group of 0 rows
            pq.ParquetWriter(sink, table.schema, **parquet_options(table)).close()
        data = sink.getvalue().to_pybytes()
        files.write_whole(self.fs, self.run.is_local, self.path(file), data)
        return {"file": file, "rows": table.num_rows, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def read_table(self, file: str, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file of the folder as it is (unchecked: see `read_checked`)."""
        if self.run.is_local:
            return pq.read_table(self.path(file), columns=columns)
        with self.fs.open(self.path(file), "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_checked(self, entry: dict, columns: Columns = None, then: str = "",
                     each: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table:
        """The Parquet file of a manifest entry, checked against it (size, sha256, rows) as it
        is read: the bytes are read once, hashed and parsed. A file that does not match is
        moved to `quarantine/` and the stage's manifest dropped (so the stage is no longer
        finished), then `DamagedFile` says which file, why, and `then` (how to remake it).
        `columns` may be a function of the file's schema (shards of either format); `each`
        turns the table read into what the caller wants (`pipeline.schema.logical`)."""
        file = entry["file"]
        try:
            with self.fs.open(self.path(file), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.drop_manifest()
            raise DamagedFile(self.where(file), "it is missing", then) from None
        why = mismatch(entry, len(data), lambda: hashlib.sha256(data).hexdigest())
        table = None
        if why is None:
            try:
                parquet = pq.ParquetFile(pa.BufferReader(data))
                table = parquet.read(columns=columns(parquet.schema_arrow) if callable(columns)
                                     else columns)
            except (OSError, pa.ArrowException) as e:
                why = f"it cannot be read as Parquet ({e})"
        if why is None and "rows" in entry and table.num_rows != entry["rows"]:
            why = f"{table.num_rows} rows where {entry['rows']} were written"
        if why is not None:
            moved = self.aside.quarantine(file, why)
            self.drop_manifest()
            raise DamagedFile(self.where(file), why, f"It was moved to {moved} (kept, never "
                              f"deleted) and the {self.name} stage is no longer finished. "
                              + then)
        return each(table) if each is not None else table

    def read_tables(self, entries: list[dict], columns: Columns = None, then: str = "",
                    each: Callable[[pa.Table], pa.Table] | None = None) -> pa.Table:
        """The Parquet files of manifest entries, each checked (`read_checked`), as one table."""
        tables = [self.read_checked(e, columns, then, each) for e in entries]
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
        out.update(bytes=self.fs.size(path), sha256=sha256_of(self.fs, path))
        return out

    def entries_under(self, folder: str) -> list[dict]:
        """Manifest entries of every file in a sub-folder (paths relative to the stage)."""
        base = self.path(folder)
        found = sorted(p for p in self.fs.find(base) if self.fs.isfile(p))
        return [self.entry(posixpath.relpath(p, self.root)) for p in found]

    # ------------------------------------------------------------------ reports and logs

    def write_bytes(self, file: str, data: bytes) -> None:
        files.write_whole(self.fs, self.run.is_local, self.path(file), data)

    def write_json(self, file: str, obj: Any) -> None:
        self.write_bytes(file, to_json(obj).encode())

    def create_json(self, file: str, obj: Any) -> bool:
        """Write `obj` only if `file` does not exist yet; returns whether this call wrote it."""
        return files.write_whole(self.fs, self.run.is_local, self.path(file),
                                 to_json(obj).encode(), exclusive=True)

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



def as_run_folder(run: "RunFolder | str | os.PathLike") -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder(run)
