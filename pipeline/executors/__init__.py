"""Executors run a stage's shards: the same stage, run in a loop here or spread over workers.

`run_stage` runs a planned stage with the named executor (today `local`, the default).
"""

from __future__ import annotations

from pipeline.run_folder import StageFolder
from pipeline.stage import Stage

EXECUTORS = {"local": "pipeline.executors.local:LocalExecutor"}


def run_stage(stage: Stage, folder: StageFolder, force: bool = False,
              executor: str = "local") -> dict:
    """Run every shard of `stage` that has no valid output in `folder`; return the manifest."""
    import importlib

    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; available: {', '.join(EXECUTORS)}")
    module, _, cls = EXECUTORS[executor].partition(":")
    return getattr(importlib.import_module(module), cls)().run(stage, folder, force)
