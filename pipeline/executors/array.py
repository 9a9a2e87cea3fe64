"""Job arrays: one stage split over independent processes that a scheduler starts (a Slurm
job array, a Kubernetes indexed job, a shell loop), with no scheduler in this code.

    distill generate --num-workers N --worker-index I     (for I in 0..N-1, anywhere)
    distill generate --finalize                           (once they are all done)

Worker I does the shards I, I+N, I+2N, ... of the plan. The plan (settings fingerprint and the
list of shards with their checksums) is written once, by whichever worker comes first
(create-if-absent); a worker started with other settings or on other input refuses, and no
worker ever deletes or rewrites a shard made by another (a finished shard is recognised by its
record, `done/<shard>.json`, or for shards made before records by its files' own metadata, and
kept). `--finalize` checks that every shard of the plan is there, made with
these settings from this input, and writes the manifest, last. A shard's content does not
depend on which worker made it or how many there were: its seeds come from the shard's name.
`--plan-only` writes the plan and stops (with `--force`, after setting the stage's previous
output aside): the step to run once before an array whose settings changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.executors.base import (commit, complete, planned_shards, reuse, said_up_to_date,
                                     work_through, writing)
from pipeline.executors.local import ProgressBar
from pipeline.fingerprints import changed_keys
from pipeline.log import log
from pipeline.run_folder import RunFolderError, StageFolder
from pipeline.stage import Stage


@dataclass
class ArrayRole:
    """This process's part in a job array: one worker, the finalize step, or the plan only."""

    num_workers: int = 0
    worker_index: int = 0
    finalize: bool = False
    plan_only: bool = False

    def __post_init__(self) -> None:
        if self.finalize or self.plan_only:
            return
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {self.num_workers}")
        if not 0 <= self.worker_index < self.num_workers:
            raise ValueError(f"--worker-index must be in 0..{self.num_workers - 1} for "
                             f"--num-workers {self.num_workers}, got {self.worker_index} "
                             "(Slurm: --worker-index $SLURM_ARRAY_TASK_ID with --array=0-"
                             f"{self.num_workers - 1})")

    def __str__(self) -> str:
        if self.finalize:
            return "finalize"
        if self.plan_only:
            return "plan only"
        return f"worker {self.worker_index} of {self.num_workers}"


def _check_plan(stage: Stage, folder: StageFolder, plan: dict, what: str) -> None:
    """Refuse to work on a folder planned with other settings or another input."""
    if plan.get("fingerprint") != stage.fingerprint:
        diff = changed_keys(plan.get("settings", {}), stage.fingerprinted)
        why = "; ".join(diff) if diff else "its input changed"
        raise RunFolderError(
            f"{what} refused: {folder} was planned with other settings ({why}). Every worker "
            "of an array must run with the same config and overrides. To start over with these "
            f"settings, run `distill {stage.name} --plan-only --force` once (it sets the "
            "stage's output aside), then start the workers again")
    if "shards" in plan and plan["shards"] != planned_shards(stage):
        raise RunFolderError(
            f"{what} refused: the input of {folder} differs from the plan its workers share "
            f"(the {stage.name} input changed since the plan was written). Run `distill "
            f"{stage.name} --plan-only --force` once, then start the workers again")


def _refuse_if_locked(folder: StageFolder, what: str) -> None:
    """Array workers share a stage by design and take no lock; they refuse while a single
    writer (`distill <stage>` without array options, a finalize) holds it."""
    from pipeline.lock import StageLock, describe, stale

    held = StageLock(folder).holder()
    if held and stale(held) is None:
        raise RunFolderError(f"{what} refused: {folder} is being written by a single writer "
                             f"({describe(held)}); wait for it to finish")


class ArrayWorker:
    """Does one worker's shards of a stage; never commits, never deletes."""

    workers_apart = True

    def __init__(self, role: ArrayRole):
        self.role = role

    def run(self, stage: Stage, folder: StageFolder, force: bool = False) -> dict | None:
        if self.role.finalize:
            return self.finalize(stage, folder, force)
        if self.role.plan_only:
            return self.plan_only(stage, folder, force)
        if force:
            raise RunFolderError(
                "--force cannot be given to an array worker: it would delete shards that "
                f"other workers are writing. Run `distill {stage.name} --plan-only --force` "
                "once before starting the workers")
        if complete(stage, folder, folder.manifest()):
            said_up_to_date(stage)
            return None
        _refuse_if_locked(folder, str(self.role))
        _check_plan(stage, folder, folder.claim_plan(
            {"fingerprint": stage.fingerprint, "settings": stage.fingerprinted,
             "shards": planned_shards(stage)}), str(self.role))
        mine = stage.shards[self.role.worker_index::self.role.num_workers]
        started = time.time()
        progress = ProgressBar(stage, mine)
        try:
            done = work_through(stage, folder, mine, progress)
        finally:
            progress.close()
        written = sum(not d.reused for d in done)
        log(stage.name, f"{self.role}: {written} shard(s) written, {len(done) - written} "
            f"already there, in {time.time() - started:.1f}s; when every worker is done, run "
            f"`distill {stage.name} --finalize` to check them all and write the manifest")
        return None

    def plan_only(self, stage: Stage, folder: StageFolder, force: bool) -> None:
        with writing(folder):
            return self._plan_only(stage, folder, force)

    def _plan_only(self, stage: Stage, folder: StageFolder, force: bool) -> None:
        manifest = folder.begin(stage.fingerprint, stage.fingerprinted, force,
                                planned_shards(stage))
        if complete(stage, folder, manifest):
            said_up_to_date(stage)
            return None
        log(stage.name, f"planned {len(stage.shards)} shards (fingerprint {stage.fingerprint}) "
            f"in {folder}; start the workers with --num-workers N --worker-index I")
        return None

    def finalize(self, stage: Stage, folder: StageFolder, force: bool) -> dict:
        with writing(folder) as lock:
            return self._finalize(stage, folder, force, lock)

    def _finalize(self, stage: Stage, folder: StageFolder, force: bool, lock) -> dict:
        if force:
            raise RunFolderError("--force and --finalize do not go together: finalize only "
                                 "checks the workers' shards and writes the manifest")
        manifest = folder.manifest()
        if complete(stage, folder, manifest):
            said_up_to_date(stage)
            return manifest
        plan = folder.plan()
        if plan is None:
            raise RunFolderError(f"nothing to finalize in {folder}: no worker has started (no "
                                 "plan.json); start them with --num-workers N --worker-index I")
        _check_plan(stage, folder, plan, "--finalize")
        started = time.time()
        done, missing = [], []
        for i, shard in enumerate(stage.shards):
            found = reuse(stage, folder, shard)
            if found is None:
                missing.append((i, shard.name))
            else:
                done.append(found)
        if missing:
            shown = ", ".join(f"{name} (#{i})" for i, name in missing[:12])
            more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
            raise RunFolderError(
                f"--finalize: {len(missing)} of {len(stage.shards)} shards are not done: "
                f"{shown}{more}. Worker I of N does shards #I, #I+N, ...; run the workers whose "
                "shards are missing again (they keep what is done), then finalize")
        folder.drop_manifest()
        return commit(stage, folder, done, started, lock)
