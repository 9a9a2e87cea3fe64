"""Executors run a stage's shards: the same stage, run in a loop here, spread over Ray actors,
or split over the independent processes of a job array.

`run_stage(stage, folder, force, executor)` runs a planned stage; `executor_for` picks the
executor a stage's settings and the command line ask for:

- `local` (the default): every shard in turn in this process (`local.py`);
- `ray`: `workers` Ray actors take shards from one queue (`ray.py`);
- a job array: `--num-workers N --worker-index I` does every N-th shard, `--finalize` commits
  (`array.py`).

Each executor a stage's `executor` setting can name registers an `ExecutorKind` in its own
file (`EXECUTORS`); the settings take their choices from there.
"""

from __future__ import annotations

from typing import Protocol

from pipeline.executors.array import ArrayRole, ArrayWorker
from pipeline.registry import EXECUTORS
from pipeline.run_folder import StageFolder
from pipeline.stage import Stage


class Executor(Protocol):
    # its workers are processes apart from this one (a worker-local request cache each)
    workers_apart: bool

    def run(self, stage: Stage, folder: StageFolder, force: bool = False) -> dict | None:
        """Run the stage's missing shards; the manifest, or None when this process only did
        its part (an array worker)."""


def executor_for(kind: str = "local", workers: int = 1, cfg=None,
                 role: ArrayRole | None = None) -> Executor:
    """The executor for a stage: a job-array role when one is given, else the registered
    executor `kind` (`cfg`: the run's config, None for the defaults)."""
    if role is not None:
        return ArrayWorker(role)
    if cfg is None:
        from pipeline.config import Config

        cfg = Config()
    return EXECUTORS.get(kind, "executor").make(workers, cfg)


def run_stage(stage: Stage, folder: StageFolder, force: bool = False,
              executor: Executor | str = "local") -> dict | None:
    """Run every shard of `stage` that has no valid output in `folder`; return the manifest
    (None from an array worker, which commits nothing)."""
    if isinstance(executor, str):
        executor = executor_for(executor)
    return executor.run(stage, folder, force)
