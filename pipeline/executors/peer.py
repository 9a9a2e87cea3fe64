"""The peers of a multi-process job (`torchrun`, `accelerate launch`): every process runs the
shard function together (a training step needs all of them), while only the main process,
under the stage's usual executor, holds the lock and writes. A peer decides whether there is
work as the main process does, by reading only, and writes nothing."""

from __future__ import annotations

from pipeline.executors.base import complete, reuse
from pipeline.run_folder import StageFolder
from pipeline.stage import Stage, no_progress


class PeerExecutor:
    """Runs the shard function of every shard the main process will do; commits nothing."""

    workers_apart = False

    def run(self, stage: Stage, folder: StageFolder, force: bool = False) -> None:
        if not force and complete(stage, folder, folder.manifest()):
            return None
        resources = stage.resources() if stage.resources is not None else None
        try:
            for shard in stage.shards:
                if not force and reuse(stage, folder, shard, repair=False) is not None:
                    continue
                stage.work(stage.settings, shard, resources, no_progress)
        finally:
            if resources is not None and hasattr(resources, "close"):
                resources.close()
        return None
