"""Shards, manifests and fingerprints: what stages hand to each other on disk.

Every file is written to a temporary name in the same folder and renamed into place, so a
file that exists is complete. A stage's manifest is written last: its existence means the
stage finished, and its fingerprint says with which settings and on which input.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
META_KEY = b"stepdistill"
MANIFEST = "manifest.json"


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are for the user to share
    return fd, tmp


def write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shard(path: Path, table: pa.Table, meta: dict) -> dict:
    """Write `table` to `path` atomically with `meta` in the Parquet metadata.

    Returns the shard's entry for a manifest: file name, rows, bytes and sha256.
    """
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(schema_meta)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"file": path.name, "rows": table.num_rows, "bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


def shard_meta(path: Path) -> dict | None:
    """The metadata written by `write_shard`, or None for a foreign or unreadable file."""
    try:
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(raw) if raw else None


def read_shards(folder: Path, files: list[str], columns: list[str] | None = None) -> pa.Table:
    tables = [pq.read_table(folder / f, columns=columns) for f in files]
    if not tables:
        raise FileNotFoundError(f"no shards listed for {folder}")
    return pa.concat_tables(tables, promote_options="default")


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    manifest = {"format_version": FORMAT_VERSION, "finished_at": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), **manifest}
    write_json_atomic(stage_dir / MANIFEST, manifest)


def manifest_digest(manifest: dict) -> str:
    """What a downstream stage depends on: the fingerprint and every output file's checksum."""
    files = sorted((s["file"], s["sha256"]) for s in manifest.get("files", []))
    return fingerprint(manifest["fingerprint"], files)


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
