"""The one runner every shard-mapping stage goes through.

A stage's core is a function over one input shard that returns its output tables and
counters. The runner owns the rest: deciding whether the stage is up to date, discarding output
made with other settings, skipping shards that are already done (their Parquet metadata records
the stage fingerprint and the checksum of the input they came from), atomic writes, and the
manifest, written last.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import store


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


@dataclass
class ShardInput:
    """One unit of work: its name, a checksum of its content, and how to load it."""

    name: str
    checksum: str
    load: Callable[[], pa.Table]


@dataclass
class ShardOutput:
    tables: dict[str, pa.Table]
    counters: dict[str, int] = field(default_factory=dict)


PLAN = "plan.json"


def prepare_stage_dir(stage: str, stage_dir: Path, fp: str, settings: dict,
                      force: bool = False) -> dict | None:
    """Make `stage_dir` hold only work done with fingerprint `fp`.

    Returns the existing manifest when it matches `fp` (the caller checks its files), else None.
    Output of a different fingerprint is deleted, and the keys that changed are printed.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest = store.read_manifest(stage_dir)
    plan_path = stage_dir / PLAN
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    previous = manifest or plan
    if force and previous is not None:
        log(stage, "--force: discarding the previous output")
    elif previous is not None and previous.get("fingerprint") != fp:
        diff = store.changed_keys(previous.get("settings", {}), settings)
        why = "; ".join(diff) if diff else "its input changed"
        log(stage, f"settings or input changed since the last run ({why}): redoing the stage")
    elif previous is not None:
        return manifest
    for child in stage_dir.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    store.write_json_atomic(plan_path, {"fingerprint": fp, "settings": settings,
                                        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return None


def manifest_is_intact(stage_dir: Path, manifest: dict) -> bool:
    for entry in manifest.get("files", []):
        path = stage_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
    return True


def run_shard_stage(
    stage: str,
    stage_dir: Path,
    fp: str,
    settings: dict,
    inputs: list[ShardInput],
    process: Callable[[ShardInput, pa.Table], ShardOutput],
    outputs: list[str],
    facts: dict | None = None,
    upstream: dict | None = None,
    force: bool = False,
    on_progress: Callable[[ShardInput, ShardOutput | None], None] | None = None,
    finalize: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Run `process` over every input shard that has no valid output yet; write the manifest.

    Output files are named `{kind}-{input name}.parquet` for each kind in `outputs`.
    `finalize(counters, facts)` may derive facts from the counters of all shards, reused ones
    included, before the manifest is written.
    """
    manifest = prepare_stage_dir(stage, stage_dir, fp, settings, force)
    wanted = {inp.name: inp.checksum for inp in inputs}
    if manifest is not None:
        recorded = {s["name"]: s["input_checksum"] for s in manifest.get("shards", [])}
        if recorded == wanted and manifest_is_intact(stage_dir, manifest):
            log(stage, f"up to date ({len(inputs)} shards, fingerprint {fp}): nothing to do")
            return manifest
        (stage_dir / store.MANIFEST).unlink()
        log(stage, "output incomplete or input changed: redoing the missing shards")

    t0 = time.time()
    shards, files = [], []
    totals: Counter = Counter()
    done = redone = 0
    for inp in inputs:
        paths = {kind: stage_dir / f"{kind}-{inp.name}.parquet" for kind in outputs}
        metas = [store.shard_meta(p) if p.is_file() else None for p in paths.values()]
        reusable = all(m is not None and m.get("fingerprint") == fp
                       and m.get("input_checksum") == inp.checksum for m in metas)
        if reusable:
            counters = metas[0].get("counters", {})
            if facts is not None:
                for key, value in metas[0].get("facts", {}).items():
                    facts.setdefault(key, value)
            entries = {}
            for kind, p in paths.items():
                entries[kind] = {"file": p.name, "rows": _rows(p), "bytes": p.stat().st_size,
                                 "sha256": store.file_sha256(p)}
            done += 1
            if on_progress:
                on_progress(inp, None)
        else:
            result = process(inp, inp.load())
            counters = dict(result.counters)
            entries = {}
            for kind, p in paths.items():
                meta = {"stage": stage, "fingerprint": fp, "input": inp.name,
                        "input_checksum": inp.checksum, "counters": counters,
                        "facts": dict(facts or {})}
                entries[kind] = store.write_shard(p, result.tables[kind], meta)
            redone += 1
            if on_progress:
                on_progress(inp, result)
        totals.update(counters)
        shards.append({"name": inp.name, "input_checksum": inp.checksum,
                       "counters": counters, "outputs": entries})
        files.extend(entries.values())

    keep = {f["file"] for f in files} | {store.MANIFEST, PLAN}
    for child in stage_dir.iterdir():
        if child.is_file() and child.name not in keep and child.suffix == ".parquet":
            child.unlink()

    if finalize is not None:
        facts = facts if facts is not None else {}
        finalize(dict(totals), facts)
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "settings": settings,
        "upstream": upstream,
        "facts": facts or {},
        "counters": dict(totals),
        "shards": shards,
        "files": files,
        "shards_reused": done,
        "shards_written": redone,
        "seconds": round(time.time() - t0, 2),
    }
    store.write_manifest(stage_dir, manifest)
    log(stage, f"done: {redone} shard(s) written, {done} reused, in {time.time() - t0:.1f}s "
        f"-> {stage_dir}")
    return manifest


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows
