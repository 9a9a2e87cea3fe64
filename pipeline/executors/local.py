"""The local executor: every shard in turn in this process, with one progress bar."""

from __future__ import annotations

import time

from tqdm import tqdm

from pipeline.executors.base import ExecutorKind, commit, up_to_date, work_through, writing
from pipeline.registry import EXECUTORS
from pipeline.run_folder import StageFolder
from pipeline.stage import Stage


class ProgressBar:
    """One bar over the rows of all shards (reused ones count at once), with running counts
    beside it: `rates` per second since the work started, the others as totals. The bar
    appears on first use, so a stage that is up to date prints none."""

    def __init__(self, stage: Stage, shards: list | None = None):
        self.stage = stage
        self.total = sum(s.rows for s in (stage.shards if shards is None else shards))
        self.bar: tqdm | None = None
        self.counts: dict[str, float] = {}
        self.started: float | None = None

    def start_clock(self) -> None:
        self.started = time.time()

    def __call__(self, rows: int = 0, **counts: float) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.stage.name, unit=self.stage.unit,
                            dynamic_ncols=True, mininterval=1.0)
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + value
        if counts and self.started is not None:
            elapsed = max(time.time() - self.started, 1e-9)
            self.bar.set_postfix_str(", ".join(
                f"{value / elapsed:.1f} {key}/s" if key in self.stage.rates
                else f"{key} {value:g}" for key, value in self.counts.items()), refresh=False)
        if rows:
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LocalExecutor:
    """Runs the shards of a stage one after the other in this process."""

    workers_apart = False

    def run(self, stage: Stage, folder: StageFolder, force: bool = False) -> dict:
        with writing(folder) as lock:
            manifest = up_to_date(stage, folder, force)
            if manifest is not None:
                return manifest
            started = time.time()
            progress = ProgressBar(stage)
            try:
                done = work_through(stage, folder, stage.shards, progress)
            finally:
                progress.close()
            return commit(stage, folder, done, started, lock)


EXECUTORS.register(ExecutorKind("local", lambda workers, cfg: LocalExecutor()))
