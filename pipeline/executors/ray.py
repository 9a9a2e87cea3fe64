"""The Ray executor: a stage's shards spread over a pool of Ray actors.

Each worker is an actor that builds the stage's resources (a teacher engine, a client) once,
at its first shard, and then takes shards one at a time from the driver's queue, writing each
shard's outputs straight into the run folder (a shared disk or object storage that every node
reaches). The driver keeps one progress bar over all shards, and commits the manifest when
every shard is done. A shard whose worker failed is tried again on another worker; a worker
that died (killed, out of memory, its node lost) is replaced first. A shard that still fails
after `ray.max_retries` more tries is given up, the other shards are still made, and then the
stage stops naming it and its last error; the shards written are kept, so running the command
again makes only what is missing.

`ray.address` empty starts a local cluster for the command and stops it after; `auto` or an
address joins a running cluster (our package must be installed on its nodes).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import Section, opt
from pipeline.executors.base import (ExecutorKind, ShardDone, close, commit, previous_outputs,
                                     reuse, up_to_date, write_outputs, writing)
from pipeline.executors.local import ProgressBar
from pipeline.log import log
from pipeline.registry import EXECUTORS
from pipeline.run_folder import StageFolder
from pipeline.stage import Shard, Stage


class ShardWorker:
    """The body of one Ray actor: a stage (without its shard list) and its resources."""

    def __init__(self, stage: Stage, folder: StageFolder):
        self.stage, self.folder = stage, folder
        self.resources, self.built = None, False

    def where(self) -> str:
        import socket

        return f"{socket.gethostname()} pid {os.getpid()}"

    def run(self, shard: Shard) -> tuple[dict, dict, dict, dict]:
        if not self.built:
            self.resources = (self.stage.resources() if self.stage.resources is not None
                              else None)
            self.built = True
        counts: Counter = Counter()

        def progress(rows: int = 0, **more: float) -> None:
            counts.update(more)

        shard = previous_outputs(self.stage, self.folder, shard)
        out = self.stage.work(self.stage.settings, shard, self.resources, progress)
        done = write_outputs(self.stage, self.folder, shard, out)
        return done.counters, done.facts, done.entries, dict(counts)

    def close(self) -> None:
        close(self.resources)
        self.resources = None


class RayExecutor:
    """Runs a stage's missing shards on `workers` Ray actors (settings: the `ray` section)."""

    workers_apart = True

    def __init__(self, workers: int, address: str = "", num_cpus_per_worker: float = 1.0,
                 num_gpus_per_worker: float = 0.0, max_retries: int = 3,
                 local_cpus: int | None = None):
        self.workers, self.address = workers, address
        self.num_cpus, self.num_gpus = num_cpus_per_worker, num_gpus_per_worker
        self.max_retries, self.local_cpus = max_retries, local_cpus

    @classmethod
    def from_config(cls, workers: int, ray_cfg) -> "RayExecutor":
        return cls(workers, ray_cfg.address, ray_cfg.num_cpus_per_worker,
                   ray_cfg.num_gpus_per_worker, ray_cfg.max_retries, ray_cfg.local_cpus)

    def _connect(self):
        try:
            import ray
        except ImportError:
            raise RuntimeError("the ray executor needs Ray: pip install 'stepdistill[ray]' (or "
                               "pip install ray), or set the stage's executor to local") from None
        if ray.is_initialized():
            return ray, False
        if self.address:
            log("ray", f"joining the Ray cluster at {self.address}")
            ray.init(address=self.address, log_to_driver=True)
        else:
            cpus = self.local_cpus or os.cpu_count() or 1
            log("ray", f"starting a local Ray cluster ({cpus} CPUs)")
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
        return ray, True

    def run(self, stage: Stage, folder: StageFolder, force: bool = False) -> dict:
        with writing(folder) as lock:
            return self._run(stage, folder, force, lock)

    def _run(self, stage: Stage, folder: StageFolder, force: bool, lock) -> dict:
        manifest = up_to_date(stage, folder, force)
        if manifest is not None:
            return manifest
        started = time.time()
        progress = ProgressBar(stage)
        done: dict[str, ShardDone] = {}
        todo: deque[Shard] = deque()
        for shard in stage.shards:
            found = reuse(stage, folder, shard)
            if found is not None:
                done[shard.name] = found
                progress(shard.rows)
            else:
                todo.append(shard)
        try:
            if todo:
                self._run_pool(stage, folder, todo, done, progress)
        finally:
            progress.close()
        return commit(stage, folder, [done[s.name] for s in stage.shards], started, lock)

    def _run_pool(self, stage: Stage, folder: StageFolder, todo: deque, done: dict,
                  progress: ProgressBar) -> None:
        ray, started_cluster = self._connect()
        Actor = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
                           max_task_retries=0)(ShardWorker)
        bare = dataclasses.replace(stage, shards=[])  # each task carries its own shard
        n = min(self.workers, len(todo))
        log(stage.name, f"{len(todo)} shard(s) to do on {n} Ray worker(s) "
            f"({self.num_cpus:g} CPU, {self.num_gpus:g} GPU each)")
        idle = [Actor.remote(bare, folder) for _ in range(n)]
        pending: dict = {}
        tries: Counter = Counter()
        failed: dict[str, str] = {}
        progress()
        progress.start_clock()
        try:
            while todo or pending:
                while todo and idle:
                    shard, actor = todo.popleft(), idle.pop()
                    pending[actor.run.remote(shard)] = (shard, actor)
                ready, _ = ray.wait(list(pending), num_returns=1)
                shard, actor = pending.pop(ready[0])
                try:
                    counters, facts, entries, counts = ray.get(ready[0])
                except ray.exceptions.RayActorError as e:
                    self._retry(stage, shard, tries, todo, failed, "its worker died", e)
                    ray.kill(actor, no_restart=True)
                    idle.append(Actor.remote(bare, folder))
                    continue
                except ray.exceptions.RayTaskError as e:
                    self._retry(stage, shard, tries, todo, failed, "it failed", e)
                    idle.append(actor)
                    continue
                done[shard.name] = ShardDone(shard, counters, facts, entries, reused=False)
                idle.append(actor)
                progress(shard.rows, **counts)
            if failed:
                said = "; ".join(f"{name} {why}" for name, why in sorted(failed.items()))
                raise RuntimeError(
                    f"{stage.name}: {len(failed)} shard(s) could not be made: {said}. The "
                    f"{len(done)} other shards are written and kept; fix the cause and run the "
                    "command again to make only these, or raise ray.max_retries")
        finally:
            for actor in idle:  # let idle workers release their engines cleanly
                try:
                    ray.get(actor.close.remote(), timeout=60)
                except Exception:  # a dead or stuck actor: killing it below is enough
                    pass
            for actor in idle + [a for _, a in pending.values()]:  # busy ones: stopped at once
                ray.kill(actor, no_restart=True)
            if started_cluster:
                ray.shutdown()

    def _retry(self, stage: Stage, shard: Shard, tries: Counter, todo: deque,
               failed: dict, what: str, error: Exception) -> None:
        """Queue a failed shard again, or give up on it (the other shards go on)."""
        tries[shard.name] += 1
        cause = _first_sentence(error)
        if tries[shard.name] > self.max_retries:
            failed[shard.name] = f"failed {tries[shard.name]} times (last: {what}: {cause})"
            log(stage.name, f"shard {shard.name} {failed[shard.name]}: giving up on it; the "
                "other shards go on")
            return
        log(stage.name, f"shard {shard.name}: {what} ({cause}); trying it again on another "
            f"worker ({tries[shard.name]} of {self.max_retries})")
        todo.append(shard)


def _first_sentence(error: Exception) -> str:
    """The gist of a Ray error: Ray's messages run to many lines of advice."""
    text = " ".join(str(error).split())
    cause = getattr(error, "cause", None)
    if cause is not None and not isinstance(cause, type(error)):
        text = f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    short = text.split(". ")[0]
    return (short[:240] + "...") if len(short) > 240 else short or type(error).__name__


EXECUTORS.register(ExecutorKind("ray", lambda workers, cfg: RayExecutor.from_config(workers,
                                                                                   cfg.ray)))


@dataclass
class RayConfig(Section):
    """The `ray` section: the cluster and its workers, read by this executor alone."""

    NAME: ClassVar[str] = "ray"

    address: str = opt("", "The Ray cluster: empty = start a local one for this command (and "
                       "stop it after); `auto` = the cluster this machine belongs to (`ray "
                       "start`); or an address such as ray://head:10001.")
    num_cpus_per_worker: float = opt(1.0, "CPUs each worker asks Ray for (torch in a worker "
                                     "uses as many threads).", gt=0.0)
    num_gpus_per_worker: float = opt(0.0, "GPUs each worker asks Ray for (1 for a vLLM or "
                                     "transformers teacher on a GPU node; fractions share one).",
                                     ge=0.0)
    max_retries: int = opt(3, "Times a shard is tried again after its worker failed or died "
                           "(a dead worker is replaced); then it is given up, the other shards "
                           "are still made, and the stage ends with its error.", ge=0, le=100)
    local_cpus: int | None = opt(None, "CPUs of the local cluster started when `address` is "
                                 "empty; null = this machine's.", ge=1)
