"""`distill convert-shards`: rewrite a run's generate and filter shards in another format,
without the teacher.

    distill convert-shards --run demo              # format 1 (float32 top-k) -> 2 (compact)
    distill convert-shards --run demo --to 1       # back to float32 lists

Each shard is converted, written beside the old one, read back and verified against the old
content (ids, texts and every other column identical; log-probabilities within half a
quantisation step, the top-1 exact); only then does it take the old one's place. The old files
are kept in `<stage>/by-fingerprint/<fingerprint>-format<N>-<time>/` (`distill gc` frees them).
The stage's manifest, its per-shard records and (for the filter) the checksums of its input
are updated, so both stages stay up to date: no teacher is built, nothing is sent. A trained
student was made from the old filter files, so `distill train` makes it again.

A conversion stopped half-way (killed, full disk) is finished by running the command again:
`<stage>/converting.json` lists the files already swapped until the manifest says so.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.executors.base import record_name
from pipeline.lock import StageLock
from pipeline.log import log
from pipeline.run_folder import ASIDE, MANIFEST, META_KEY, PLAN, RunFolder, StageFolder
from pipeline.schema import as_format, logical, shard_format
from pipeline.topk_codec import DEFAULT_STEP_EXP

JOURNAL = "converting.json"
STAGES = ("generate", "filter")


class ConversionError(RuntimeError):
    """A converted shard does not hold what the old one did: nothing was replaced."""


def verify(old: pa.Table, new: pa.Table, file: str) -> None:
    """`new` (converted) holds `old`'s content: every column but the top-k log-probabilities
    identical, those within half a quantisation step (exact when both are format 1)."""
    a, b = logical(old), logical(new)
    if a.schema.names != b.schema.names or a.num_rows != b.num_rows:
        raise ConversionError(f"{file}: columns or rows differ after conversion")
    for name in a.schema.names:
        if name == "topk_logprobs":
            continue
        if not a.column(name).equals(b.column(name)):
            raise ConversionError(f"{file}: column {name} differs after conversion")
    if "topk_logprobs" not in a.schema.names:
        return
    x = a.column("topk_logprobs").combine_chunks().flatten().flatten().to_numpy(
        zero_copy_only=False)
    y = b.column("topk_logprobs").combine_chunks().flatten().flatten().to_numpy(
        zero_copy_only=False)
    same_inf = np.array_equal(np.isneginf(x), np.isneginf(y))
    finite = np.isfinite(x)
    err = float(np.abs(x[finite] - y[finite]).max()) if finite.any() else 0.0
    limit = 2.0 ** -(DEFAULT_STEP_EXP + 1) + 1e-6
    if not same_inf or err > limit:
        raise ConversionError(f"{file}: top-k log-probabilities differ by {err:.3g} nats after "
                              f"conversion (at most {limit:.3g} expected)")


def _plain(table: pa.Table) -> pa.Table:
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != META_KEY}
    return table.replace_schema_metadata(meta or None)


def convert_stage(folder: StageFolder, to: int, checksums: dict[str, str]) -> dict[str, str]:
    """Convert one finished stage's shards to format `to`, holding its lock. `checksums`: the
    upstream's old -> new sha256 (the filter's inputs). Returns this stage's old -> new."""
    manifest = folder.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{folder} is not finished (no manifest): run the stage to the "
                                "end first, then convert")
    with StageLock(folder):
        try:
            journal = folder.read_json(JOURNAL)
        except FileNotFoundError:
            journal = {"aside": None, "swapped": {}, "old": {}}
        swapped: dict[str, dict] = journal["swapped"]
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = journal["aside"] or (f"{ASIDE}/{manifest['fingerprint']}-format"
                                     f"{3 - to}-{stamp}")
        journal["aside"] = aside
        n_done = 0
        for shard in manifest["shards"]:
            for kind, entry in list(shard["outputs"].items()):
                file = entry["file"]
                if file in swapped:  # journaled by a conversion that was stopped
                    if folder.problem(swapped[file]) is None:
                        continue                    # in place
                    if folder.problem(entry) is not None:
                        raise ConversionError(
                            f"{folder.where(file)} is neither the old nor the converted shard; "
                            f"the old one is in {folder.where(aside)}")
                    del swapped[file]               # stopped before its swap: do it again
                then = (f"Nothing was converted for it; run `distill {folder.name}` to remake "
                        "it, then convert again")
                old = folder.read_checked(entry, then=then)
                if shard_format(old.schema) in (0, to):
                    continue
                meta = folder.table_meta(file) or {}
                if meta.get("input_checksum") in checksums:
                    meta["input_checksum"] = checksums[meta["input_checksum"]]
                new = as_format(_plain(old), to)
                tmp = f"{file}.convert.tmp"
                new_entry = folder.write_table(tmp, new, meta)
                verify(old, folder.read_checked(new_entry), folder.where(file))
                folder.fs.makedirs(folder.path(aside), exist_ok=True)
                folder.fs.copy(folder.path(file), folder.path(f"{aside}/{file}"))
                swapped[file] = {**new_entry, "file": file}
                journal["old"][file] = entry["sha256"]
                folder.write_json(JOURNAL, journal)
                folder.move(tmp, file)
                n_done += 1
                # the manifest follows at once, so a stop leaves no file it does not describe
                _update(folder, manifest, swapped, checksums)
        _update(folder, manifest, swapped, checksums)
        plan = folder.plan()
        if plan is not None and plan.get("shards"):
            for s in plan["shards"]:
                s["checksum"] = checksums.get(s.get("checksum"), s.get("checksum"))
            folder.write_json(PLAN, plan)
        changed = {journal["old"][f]: e["sha256"] for f, e in swapped.items()}
        folder.remove(JOURNAL)
        if swapped:
            log(folder.name, f"{len(swapped)} shard file(s) in format {to} ({n_done} converted "
                f"now); the old ones are kept in {folder.where(aside)} (`distill gc` frees "
                "them)")
        else:
            log(folder.name, f"already in format {to}: nothing to do")
    return changed


def _update(folder: StageFolder, manifest: dict, swapped: dict[str, dict],
            checksums: dict[str, str]) -> None:
    """The manifest and the shards' records with the swapped files' entries (and the new
    checksums of their inputs), written."""
    for shard in manifest["shards"]:
        outputs = shard["outputs"]
        if not any(e["file"] in swapped and e != swapped[e["file"]] for e in outputs.values()):
            continue
        for kind, entry in list(outputs.items()):
            if entry["file"] in swapped:
                outputs[kind] = swapped[entry["file"]]
        shard["input_checksum"] = checksums.get(shard["input_checksum"], shard["input_checksum"])
        try:
            record = folder.read_json(record_name(shard["name"]))
        except FileNotFoundError:
            record = None
        if record is not None:
            record["input_checksum"] = shard["input_checksum"]
            record["outputs"] = outputs
            folder.write_json(record_name(shard["name"]), record)
    manifest["files"] = [swapped.get(e["file"], e) for e in manifest["files"]]
    if swapped:
        folder.write_json(MANIFEST, manifest)


def convert_run(run: RunFolder, to: int = 2) -> dict[str, int]:
    """Convert the run's generate and filter shards to format `to`; returns the bytes of the
    shard files of each stage before and after."""
    sizes = {}
    checksums: dict[str, str] = {}
    for name in STAGES:
        folder = run.stage(name)
        if folder.manifest() is None:
            if name == "generate":
                raise FileNotFoundError(f"{folder} is not finished (no manifest): run `distill "
                                        "generate` to the end first, then convert")
            log(name, "not finished: nothing to convert (it will read the converted shards)")
            continue
        before = sum(e["bytes"] for e in folder.manifest()["files"])
        checksums = convert_stage(folder, to, checksums)
        after = sum(e["bytes"] for e in folder.manifest()["files"])
        sizes[name] = (before, after)
        log(name, f"shard files: {before:,} -> {after:,} bytes")
    return sizes
