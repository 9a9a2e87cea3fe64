"""What every executor shares: deciding whether a stage is up to date, reusing finished shards,
writing a shard's outputs, and committing the manifest.

A finished shard is recognised by its record, `done/<shard>.json`, written after its output
files: the stage fingerprint, the checksum of the input shard, and every output file's size and
sha256. A stopped stage resumes with exactly the missing shards; a shard whose files do not
match their record (damaged on disk) is quarantined and redone alone; the manifest is written
last. Every check of a finished stage reads its files against the sha256 its manifest holds.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.log import log
from pipeline.run_folder import MANIFEST, PLAN, RECORDS, StageFolder
from pipeline.stage import Shard, ShardOutput, Stage


@dataclass(frozen=True)
class ExecutorKind:
    """A way to run a stage's shards, chosen by a stage's `executor` setting; declared by its
    own file (`EXECUTORS.register(ExecutorKind(...))`).

    name (`str`): the setting's value.
    make: `make(workers, cfg)` -> the `Executor`, from the stage's `workers` setting and the
        run's config (for a section of the executor's own, such as `ray`).
    """

    name: str
    make: Callable[[int, Any], Any]  # -> an `Executor`


@dataclass
class ShardDone:
    """A shard whose outputs are on disk: what its manifest entry needs."""

    shard: Shard
    counters: dict
    facts: dict
    entries: dict[str, dict]
    reused: bool
    folder_files: list[dict] = dataclasses.field(default_factory=list)  # `Stage.folders`' files

    @property
    def files(self) -> list[dict]:
        """Every file the shard's output is made of, as manifest entries."""
        return [*self.entries.values(), *self.folder_files]


def planned_shards(stage: Stage) -> list[dict]:
    """The plan's list of shards: what every worker must agree on."""
    return [{"name": s.name, "checksum": s.checksum, "rows": s.rows} for s in stage.shards]


def record_name(shard: str) -> str:
    return f"{RECORDS}/{shard}.json"


def _shard_inputs(stage: Stage, manifest: dict) -> tuple[dict, dict]:
    """Shard name -> input checksum: as the manifest recorded them, and as this call wants."""
    return ({s["name"]: s["input_checksum"] for s in manifest.get("shards", [])},
            {s.name: s.checksum for s in stage.shards})


def complete(stage: Stage, folder: StageFolder, manifest: dict | None,
             repair: bool = False) -> bool:
    """Whether `manifest` is this stage's, for this input, with every file in place as
    written (sizes and sha256). `repair`: damaged files are quarantined on the way."""
    if manifest is None or manifest.get("fingerprint") != stage.fingerprint:
        return False
    recorded, wanted = _shard_inputs(stage, manifest)
    if recorded != wanted:
        return False
    if stage.redo is not None and any(stage.redo(s) for s in manifest.get("shards", [])):
        return False
    return not folder.problems(manifest.get("files", []), quarantine=repair)


def said_up_to_date(stage: Stage) -> None:
    log(stage.name, f"up to date ({len(stage.shards)} shards, fingerprint "
        f"{stage.fingerprint}): nothing to do")


def up_to_date(stage: Stage, folder: StageFolder, force: bool) -> dict | None:
    """The stage's manifest when its output is complete for these settings and this input
    (every file checked against its sha256; the stage's own files, not those of the stage
    before it, which are checked as they are read); otherwise None, and the folder is ready for
    work (other settings' output set aside, damaged files quarantined, a stale manifest
    dropped)."""
    manifest = folder.begin(stage.fingerprint, stage.fingerprinted, force, planned_shards(stage))
    if manifest is None:
        return None
    if complete(stage, folder, manifest, repair=True):
        said_up_to_date(stage)
        return manifest
    folder.drop_manifest()
    log(stage.name, why_redone(stage, manifest))
    return None


def why_redone(stage: Stage, manifest: dict) -> str:
    """What the log says when the last manifest does not cover this call: a call that asks
    for another set of shards (eval of other systems, another shard count) reuses what is done
    and is not told its output is damaged."""
    recorded, wanted = _shard_inputs(stage, manifest)
    if (manifest.get("fingerprint") == stage.fingerprint and set(recorded) != set(wanted)
            and all(recorded[n] == wanted[n] for n in set(recorded) & set(wanted))):
        return ("the last run made another set of shards: reusing those already done with "
                "these settings, doing the rest")
    return ("output incomplete, damaged or made from another input: redoing the shards "
            "concerned")


def reuse(stage: Stage, folder: StageFolder, shard: Shard,
          repair: bool = True) -> ShardDone | None:
    """The shard's outputs when they are on disk as its record says, made with these settings
    from this input; files that do not match their record are quarantined (and the shard is
    done again; `repair=False`: only looked at)."""
    try:
        record = folder.read_json(record_name(shard.name))
    except (FileNotFoundError, ValueError):
        return _reuse_unrecorded(stage, folder, shard)
    if (record.get("fingerprint") != stage.fingerprint
            or record.get("input_checksum") != shard.checksum
            or set(record.get("outputs", {})) != set(stage.outputs)
            or set(record.get("folders", {})) != set(stage.folders)):
        return None
    if stage.redo is not None and stage.redo(record):
        return None
    entries = record["outputs"]
    in_folders = [e for entries_ in record.get("folders", {}).values() for e in entries_]
    if folder.problems([*entries.values(), *in_folders], quarantine=repair):
        return None
    return ShardDone(shard, record.get("counters", {}), record.get("facts", {}),
                     entries, reused=True, folder_files=in_folders)


def _reuse_unrecorded(stage: Stage, folder: StageFolder, shard: Shard) -> ShardDone | None:
    """A shard written before shards had records: recognised by its files' own metadata."""
    if stage.folders or not stage.outputs:  # such shards only ever wrote tables
        return None
    files = {kind: stage.output_name(kind, shard.name) for kind in stage.outputs}
    metas = [folder.table_meta(f) for f in files.values()]
    if not all(m is not None and m.get("fingerprint") == stage.fingerprint
               and m.get("input_checksum") == shard.checksum for m in metas):
        return None
    counters, facts = metas[0].get("counters", {}), metas[0].get("facts", {})
    if stage.redo is not None and stage.redo({"counters": counters, "facts": facts}):
        return None
    return ShardDone(shard, counters, facts,
                     {kind: folder.entry(f) for kind, f in files.items()}, reused=True)


def previous_outputs(stage: Stage, folder: StageFolder, shard: Shard) -> Shard:
    """The shard with its previous outputs attached (checked against its record), when it is
    redone on purpose (`Stage.redo`)."""
    try:
        record = folder.read_json(record_name(shard.name))
    except (FileNotFoundError, ValueError):
        return shard
    if (stage.redo is None or record.get("fingerprint") != stage.fingerprint
            or record.get("input_checksum") != shard.checksum or not stage.redo(record)):
        return shard
    entries = record["outputs"]
    tables = {kind: folder.read_checked(entry) for kind, entry in entries.items()}
    return dataclasses.replace(shard, previous=lambda: tables,
                               previous_counters=record.get("counters", {}))


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
            shard = previous_outputs(stage, folder, shard)
            out = stage.work(stage.settings, shard, resources, progress)
            done.append(write_outputs(stage, folder, shard, out))
    finally:
        close(resources)
    return done


def write_outputs(stage: Stage, folder: StageFolder, shard: Shard,
                  out: ShardOutput) -> ShardDone:
    """Write a shard's output tables, each recording what made it, then the shard's record.
    A paid-for stage's earlier outputs of the shard are set aside first, never overwritten."""
    missing = [kind for kind in stage.outputs if kind not in out.tables]
    if missing:
        raise RuntimeError(f"the {stage.name} shard function returned no {missing} table for "
                           f"shard {shard.name}")
    names = {kind: stage.output_name(kind, shard.name) for kind in stage.outputs}
    if stage.paid:
        there = [n for n in names.values() if folder.exists(n)]
        if there:
            moved = folder.aside.keep(f"{stage.fingerprint}-replaced-"
                                     f"{time.strftime('%Y%m%dT%H%M%S')}", there)
            log(stage.name, f"shard {shard.name}: its earlier output is kept in "
                f"{folder.where(moved)}")
    missing = [name for name in stage.folders if name not in out.folders]
    if missing:
        raise RuntimeError(f"the {stage.name} shard function built no {missing} folder for "
                           f"shard {shard.name}")
    facts = {**stage.facts, **out.facts}
    meta = {"stage": stage.name, "fingerprint": stage.fingerprint, "input": shard.name,
            "input_checksum": shard.checksum, "counters": out.counters, "facts": facts}
    entries = {kind: folder.write_table(names[kind], out.tables[kind], meta)
               for kind in stage.outputs}
    folders = {}
    for name in stage.folders:
        folder.local.publish_dir(out.folders[name], name)
        folders[name] = folder.entries_under(name)
    folder.write_json(record_name(shard.name), {
        "shard": shard.name, "fingerprint": stage.fingerprint, "input_checksum": shard.checksum,
        "counters": dict(out.counters), "facts": dict(out.facts), "outputs": entries,
        **({"folders": folders} if folders else {})})
    return ShardDone(shard, dict(out.counters), dict(out.facts), entries, reused=False,
                     folder_files=[e for found in folders.values() for e in found])


def commit(stage: Stage, folder: StageFolder, done: list[ShardDone], started: float,
           lock=None) -> dict:
    """Write the manifest of a stage whose every shard is done (in plan order). Output files
    of shards no longer planned are set aside (`by-fingerprint/`), never deleted. `lock`: the
    stage's lock, checked first (a writer that lost it must not commit)."""
    if lock is not None:
        lock.check()
    files = [e for d in done for e in d.files]
    if stage.prune:
        keep = {f["file"] for f in files} | {MANIFEST, PLAN}
        stale = [n for n in folder.files(".parquet") if n not in keep]
        planned = {record_name(d.shard.name) for d in done}
        stale += [f for f in folder.files_under(RECORDS, ".json") if f not in planned]
        if stale:
            folder.aside.keep(f"{stage.fingerprint}-unplanned-{time.strftime('%Y%m%dT%H%M%S')}",
                             stale)
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
        "settings": stage.fingerprinted,
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
    manifest = folder.write_manifest(manifest)
    log(stage.name, f"done: {written} shard(s) written, {len(done) - written} reused, in "
        f"{time.time() - started:.1f}s -> {folder}")
    return manifest


@contextmanager
def writing(folder: StageFolder):
    """Hold the stage's lock while writing it (a second writer is refused, naming the holder);
    the temporary files of writers that died are cleaned first. Yields the lock."""
    from pipeline.lock import StageLock

    with StageLock(folder) as lock:
        folder.clean_temporary()
        yield lock


def close(resources) -> None:
    """Release what a stage's resource factory built (an engine, a client), if it can be."""
    if resources is not None and hasattr(resources, "close"):
        resources.close()
