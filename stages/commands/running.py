"""Running stages from a command: several in order on one run folder (each in its own
process where asked), and a failure the user can fix said in one line with its exit code.
`distill` (`stages.commands.cli`) and the commands that drive stages (`iterate`, `compare`,
`coverage`, `sweep`) share it."""

from __future__ import annotations

import os
import posixpath
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import Config, ConfigError
from pipeline.executors.array import ArrayRole
from pipeline.kept_aside import LOCK
from pipeline.log import is_main_process, log, set_verbosity
from pipeline.run_folder import RunFolder, as_run_folder
from pipeline.secrets import scrub

STAGES = ["generate", "filter", "train", "eval"]


def _stage_main(name: str):
    if name == "generate":
        from stages.generate.stage import main
    elif name == "filter":
        from stages.filter.stage import main
    elif name == "train":
        from stages.train.stage import main
    else:
        from stages.eval.stage import main
    return main


def run_stages(names: list[str], cfg: Config, run: RunFolder | str | Path,
               force: bool = False, role: ArrayRole | None = None,
               separate_processes: bool = False, retry_failed: bool = False) -> None:
    """Run the named stages in order on one run folder (its `config.yaml` is the last
    configuration a stage ran with); `role`: a job-array part of a generate or filter run.
    `separate_processes`: each stage in a fresh process (what `distill all` does), so the
    teacher engine's memory is given back before the student trains. `retry_failed`: the
    generate stage re-sends the rows that ended with an error."""
    run = as_run_folder(run)
    if len(names) > 1 and os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("under torchrun / accelerate launch run one stage (`distill train`), "
                         "not several: generate, filter and eval run once, in one process")
    new = is_main_process() and role is None and not run.fs.isdir(run.root)
    # array workers leave the run's config to the plan; other ranks to the main process
    if (role is None or role.plan_only) and is_main_process():
        run.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        _run_each(names, cfg, run, force, role, separate_processes, retry_failed)
    except BaseException:
        if new:
            forget_empty_run(run)
        raise


def forget_empty_run(run: RunFolder) -> bool:
    """Remove a run folder that a failed command has just made and that holds nothing but
    its bookkeeping (the config, plans, locks, empty folders): a mistyped run name or a model
    that does not load leaves no folder behind. Anything else in it (a shard, a cached
    response) keeps the whole folder."""
    bookkeeping = {"config.yaml", "plan.json", LOCK}
    files = [p for p in run.fs.find(run.root) if run.fs.isfile(p)]
    if any(posixpath.basename(p) not in bookkeeping for p in files):
        return False
    run.fs.rm(run.root, recursive=True)
    return True


def _run_each(names, cfg, run, force, role, separate_processes, retry_failed) -> None:
    for name in names:
        t0 = time.time()
        say(f"==> {name} ({run})")
        extra = {"retry_failed": True} if retry_failed and name == "generate" else {}
        if role is not None:
            _stage_main(name)(cfg, run, force=force, role=role, **extra)
        elif len(names) > 1 and separate_processes:
            _in_child(name, cfg, run, force, extra)
        else:
            _stage_main(name)(cfg, run, force=force, **extra)
        say(f"==> {name} finished in {time.time() - t0:.1f}s")


class StageFailed(Exception):
    """A stage run in a child process failed; the child has said why."""

    def __init__(self, code: int):
        super().__init__(f"exit code {code}")
        self.code = code


def _child(name: str, cfg: Config, url: str, force: bool, extra: dict) -> None:
    import resource

    from pipeline.log import VERBOSITY

    set_verbosity(int(os.environ.get(VERBOSITY, "0") or 0))
    code = reported(lambda: _stage_main(name)(cfg, RunFolder(url), force=force, **extra))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    say(f"==> {name}: peak resident memory {peak:,.0f} MiB")
    sys.exit(code)


def _in_child(name: str, cfg: Config, run: RunFolder, force: bool, extra: dict) -> None:
    """Run one stage in a fresh process (spawned: no engine, thread pool or CUDA context is
    inherited) and wait for it; its memory is the operating system's again when it ends."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_child, args=(name, cfg, run.url, force, extra), name=f"distill-{name}")
    child.start()
    try:
        child.join()
    except KeyboardInterrupt:
        child.join()
        raise
    if child.exitcode != 0:
        raise StageFailed(130 if child.exitcode in (-2, 130) else child.exitcode or 1)


def say(line: str) -> None:
    log("", line)


def reported(work) -> int:
    """Runs `work()`; a failure the user can fix is printed as one `error:` line (the exit
    code says which kind: 2 configuration, 1 input or run, 130 interrupted)."""
    try:
        work()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {scrub(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a permission, a lost mount: the system's words
        what = f"{e.strerror or e} ({e.filename})" if e.filename else (e.strerror or str(e))
        print(f"error: {scrub(what)}. Finished work is kept and nothing half-written is "
              "trusted: fix the cause (free disk space, permissions) and run the same command "
              "again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except StageFailed as e:  # the stage's own process has printed the error
        return e.code
    return 0
