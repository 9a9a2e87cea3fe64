"""What every executor shares: deciding whether a stage is up to date, reusing finished shards,
writing a shard's outputs, and committing the manifest.

A finished shard is recognised by its own files: each output's Parquet metadata records the
stage fingerprint and the checksum of the input shard it came from, so a stopped stage resumes
with exactly the missing shards, and a deleted or stale one is redone alone. The manifest is
written last.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from pipeline.log import log
from pipeline.run_folder import MANIFEST, PLAN, StageFolder
from pipeline.stage import Shard, ShardOutput, Stage


@dataclass
class ShardDone:
    """A shard whose outputs are on disk: what its manifest entry needs."""

    shard: Shard
    counters: dict
    facts: dict
    entries: dict[str, dict]
    reused: bool


def planned_shards(stage: Stage) -> list[dict]:
    """The plan's list of shards: what every worker must agree on."""
    return [{"name": s.name, "checksum": s.checksum, "rows": s.rows} for s in stage.shards]


def complete(stage: Stage, folder: StageFolder, manifest: dict | None) -> bool:
    """Whether `manifest` is this stage's, for this input, with every file in place."""
    if manifest is None or manifest.get("fingerprint") != stage.fingerprint:
        return False
    wanted = {s.name: s.checksum for s in stage.shards}
    recorded = {s["name"]: s["input_checksum"] for s in manifest.get("shards", [])}
    return recorded == wanted and folder.intact(manifest)


def said_up_to_date(stage: Stage) -> None:
    log(stage.name, f"up to date ({len(stage.shards)} shards, fingerprint "
        f"{stage.fingerprint}): nothing to do")


def up_to_date(stage: Stage, folder: StageFolder, force: bool) -> dict | None:
    """The stage's manifest when its output is complete for these settings and this input;
    otherwise None, and the folder is ready for work (other settings' output removed, a stale
    manifest dropped)."""
    manifest = folder.begin(stage.fingerprint, stage.settings, force, planned_shards(stage))
    if manifest is None:
        return None
    if complete(stage, folder, manifest):
        said_up_to_date(stage)
        return manifest
    folder.drop_manifest()
    log(stage.name, "output incomplete or input changed: redoing the missing shards")
    return None


def reuse(stage: Stage, folder: StageFolder, shard: Shard) -> ShardDone | None:
    """The shard's outputs when they are on disk, made with these settings from this input."""
    files = {kind: stage.output_name(kind, shard.name) for kind in stage.outputs}
    metas = [folder.table_meta(f) for f in files.values()]
    if not all(m is not None and m.get("fingerprint") == stage.fingerprint
               and m.get("input_checksum") == shard.checksum for m in metas):
        return None
    return ShardDone(shard, metas[0].get("counters", {}), metas[0].get("facts", {}),
                     {kind: folder.entry(f) for kind, f in files.items()}, reused=True)


def work_through(stage: Stage, folder: StageFolder, shards: list[Shard],
                 progress) -> list[ShardDone]:
    """Do `shards` in turn in this process: reuse a finished one, else build the worker's
    resources (once, at the first shard with work), run the shard function and write its
    outputs. Resources are closed at the end, also on a crash."""
    resources, built = None, False
    done: list[ShardDone] = []
    try:
        for shard in shards:
            reused = reuse(stage, folder, shard)
            if reused is not None:
                done.append(reused)
                progress(shard.rows)
                continue
            if not built:
                resources = stage.resources() if stage.resources is not None else None
                built = True
                progress()
                if hasattr(progress, "start_clock"):
                    progress.start_clock()
            out = stage.work(stage.params, shard, resources, progress)
            done.append(write_outputs(stage, folder, shard, out))
    finally:
        close(resources)
    return done


def write_outputs(stage: Stage, folder: StageFolder, shard: Shard,
                  out: ShardOutput) -> ShardDone:
    """Write a shard's output tables, each recording what made it."""
    missing = [kind for kind in stage.outputs if kind not in out.tables]
    if missing:
        raise RuntimeError(f"the {stage.name} shard function returned no {missing} table for "
                           f"shard {shard.name}")
    facts = {**stage.facts, **out.facts}
    meta = {"stage": stage.name, "fingerprint": stage.fingerprint, "input": shard.name,
            "input_checksum": shard.checksum, "counters": out.counters, "facts": facts}
    entries = {kind: folder.write_table(stage.output_name(kind, shard.name), out.tables[kind],
                                        meta) for kind in stage.outputs}
    return ShardDone(shard, dict(out.counters), dict(out.facts), entries, reused=False)


def commit(stage: Stage, folder: StageFolder, done: list[ShardDone], started: float) -> dict:
    """Write the manifest of a stage whose every shard is done (in plan order)."""
    files = [e for d in done for e in d.entries.values()]
    if stage.prune:
        keep = {f["file"] for f in files} | {MANIFEST, PLAN}
        for name in folder.files(".parquet"):
            if name not in keep:
                folder.remove(name)
    totals: Counter = Counter()
    facts = dict(stage.facts)
    for d in done:
        totals.update(d.counters)
        if d.reused:  # facts of this run's own shards win over those recorded earlier
            for key, value in d.facts.items():
                facts.setdefault(key, value)
        else:
            facts.update(d.facts)
    written = sum(not d.reused for d in done)
    manifest = {
        "stage": stage.name,
        "fingerprint": stage.fingerprint,
        "settings": stage.settings,
        "upstream": stage.upstream,
        "facts": facts,
        "counters": dict(totals),
        "shards": [{"name": d.shard.name, "input_checksum": d.shard.checksum,
                    "counters": d.counters, "outputs": d.entries} for d in done],
        "files": files,
        "shards_reused": len(done) - written,
        "shards_written": written,
        "seconds": round(time.time() - started, 2),
    }
    if stage.finalize is not None:
        stage.finalize(manifest)
    folder.write_manifest(manifest)
    log(stage.name, f"done: {written} shard(s) written, {len(done) - written} reused, in "
        f"{time.time() - started:.1f}s -> {folder}")
    return manifest


def close(resources) -> None:
    """Release what a stage's resource factory built (an engine, a client), if it can be."""
    if resources is not None and hasattr(resources, "close"):
        resources.close()
