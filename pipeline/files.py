"""Files written whole and checked against what was recorded of them: the run folder's
lowest layer (fsspec file systems, local or object storage)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa


class RunFolderError(RuntimeError):
    """A run folder cannot do what was asked of it (the message says why and what to do)."""


def parquet_options(table: pa.Table) -> dict:
    """How shards are written, each choice measured on the demo's generate shards while
    designing format 2 (`make bench ONLY=shards` prints the result and level 19's): zstd level
    9 (level 19 saves little at a small fraction of the speed); no column statistics (a min/max
    of whole prompts or code rows is of no use to us and costs bytes in every page); float
    lists split into byte streams, which zstd compresses better; dictionary encoding only for
    the scalar columns."""
    floats = [f.name for f in table.schema if pa.types.is_list(f.type)
              and pa.types.is_floating(f.type.value_type)]
    scalars = [f.name for f in table.schema if not pa.types.is_list(f.type)
               and not pa.types.is_binary(f.type)]
    return {"compression": "zstd", "compression_level": 9, "write_statistics": False,
            "use_dictionary": scalars, "use_byte_stream_split": floats}


def mismatch(entry: dict, size: int, sha256) -> str | None:
    """Why a file of `size` bytes (and the digest `sha256()`, computed only when the size
    matches) is not the one its manifest entry records, or None."""
    if size != entry["bytes"]:
        return f"{size} bytes where {entry['bytes']} were written"
    if "sha256" in entry and sha256() != entry["sha256"]:
        return "its sha256 is not the one recorded when it was written"
    return None


def sha256_of(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def write_whole(fs, is_local: bool, path: str, data: bytes, exclusive: bool = False) -> bool:
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
