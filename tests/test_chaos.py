"""Chaos: kill -9 at random points, damaged bytes, two writers and a misbehaving server.

After each fault a rerun must end with every row present once, nothing damaged trusted, no
finished request sent again, and no key on disk. The teacher is an OpenAI-compatible server on
127.0.0.1 that injects failures (tests/fake_openai.py) and counts what it answers; training
runs the embedded model. Random points come from a seeded generator (the seed is printed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
from fake_openai import FakeServer
from pipeline.schema import logical
from pipeline.config import load_config
from pipeline.run_folder import DamagedFile, RunFolder

pytestmark = pytest.mark.slow

KEY = "sk-chaos-NEVER-ON-DISK-9f8e7d6c5b4a39281706"
ROWS = 64
CONCURRENCY = 4


def overrides(url: str, *more: str) -> list[str]:
    return [f"task.n_train={ROWS}", "generate.rows_per_shard=8", "generate.n_samples=1",
            "generate.backend=openai", "generate.server_token_ids=true", "generate.model=fake",
            "generate.top_k=4", f"generate.concurrency={CONCURRENCY}",
            "generate.request_timeout=5", "generate.backoff_max=0.05", "generate.max_retries=6",
            "generate.api_key_env=CHAOS_KEY", f"generate.base_url={url}", *more]


def args_for(runs: Path, url: str, stage: str = "generate", *more: str) -> list[str]:
    return [sys.executable, "-m", "stages.commands.cli", stage, "--config", "configs/demo.yaml",
            "--run", "r", "--runs-dir", str(runs), *overrides(url, *more)]


def env() -> dict:
    return {**os.environ, "CHAOS_KEY": KEY, "STEPDISTILL_LOCK_LEASE_S": "20"}


def config(url: str):
    return load_config("configs/demo.yaml", overrides(url))


def no_key_under(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def every_row_once(run: Path) -> None:
    folder = RunFolder(run).stage("generate")
    manifest = folder.manifest()
    assert manifest is not None
    table = folder.read_tables(manifest["files"], each=logical)  # checked against the manifest's sha256
    ids = table.column("id").to_pylist()
    assert sorted(ids) == [f"demo-train-{i:06d}" for i in range(ROWS)]
    assert table.column("error").null_count == ROWS


def test_generate_killed_at_random_points_under_a_faulty_server(tmp_path):
    """A server that answers 429, 5xx, drops connections, stalls, and sends bad or cut-short
    JSON; the generate command killed -9 at random points, four times, then run to the end."""
    seed = random.randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    cfg = config("http://unused")
    template = generate.PromptTemplate(cfg.generate.prompt_template)
    from pipeline.tasks import load_split

    prompts = [template.render(r["question"]) for r in load_split(cfg.task, "train")
               .to_pylist()[:ROWS]]
    faults = ["429", "500", "503", "drop", "stall", "malformed", "truncated"]
    scripts = {p: rng.sample(faults, rng.randint(0, 2)) + ["ok"] for p in prompts}
    # the timeout far above an answer's time on a loaded machine (an answer the client gave up
    # on would be sent twice and counted as resent), the stall far above the timeout
    with FakeServer(scripts, stall_seconds=8.0, delay=0.05) as server:
        args = args_for(tmp_path, server.base_url)
        kills = 0
        for _ in range(4):
            proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            wait = rng.uniform(1.0, 6.0)  # start-up (imports) included: any point may be hit
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
            time.sleep(0.3)
        final = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr
        assert KEY not in final.stderr
    every_row_once(tmp_path / "r")
    # a finished request is never sent again; only those in flight at a kill can be (their
    # answers never reached the disk): at most `concurrency` per kill
    resent = sum(n - 1 for n in server.successes.values() if n > 1)
    assert resent <= kills * CONCURRENCY, (resent, kills)
    assert set(server.successes) == set(prompts)
    assert not list((tmp_path / "r").rglob(".*.tmp"))
    no_key_under(tmp_path)


def test_a_server_that_echoes_the_rejected_key_gets_it_nowhere(tmp_path):
    """401 with the key in its body, on the first run and on a rerun after a good one."""
    with FakeServer() as server:
        good = subprocess.run(args_for(tmp_path, server.base_url), env=env(),
                              capture_output=True, text=True, timeout=300)
        assert good.returncode == 0, good.stderr
    with FakeServer(default="401") as server:
        for args in (args_for(tmp_path, server.base_url, "generate", "generate.seed=7"),
                     args_for(tmp_path, server.base_url, "all", "generate.seed=8")):
            bad = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
            assert bad.returncode == 1
            assert "401 Unauthorized" in bad.stderr and "Traceback" not in bad.stderr
            assert KEY not in bad.stderr + bad.stdout and KEY[9:] not in bad.stderr
    no_key_under(tmp_path)


def test_filter_killed_at_random_points(tmp_path):
    seed = random.randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    with FakeServer() as server:
        gen = subprocess.run(args_for(tmp_path, server.base_url), env=env(),
                             capture_output=True, text=True, timeout=300)
        assert gen.returncode == 0, gen.stderr
        filt = args_for(tmp_path, server.base_url, "filter", "filter.plot=false")
        for trial in range(6):
            proc = subprocess.Popen(filt + (["--force"] if trial % 2 else []), env=env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=rng.uniform(0.5, 5.0))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        final = subprocess.run(filt, env=env(), capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr
    folder = RunFolder(tmp_path / "r").stage("filter")
    manifest = folder.manifest()
    kept = folder.read_tables([s["outputs"]["kept"] for s in manifest["shards"]])
    rejected = folder.read_tables([s["outputs"]["rejected"] for s in manifest["shards"]])
    seen = kept.column("id").to_pylist() + rejected.column("id").to_pylist()
    assert sorted(seen) == [f"demo-train-{i:06d}" for i in range(ROWS)]
    assert manifest["counters"]["traces_in"] == ROWS
    assert not list((tmp_path / "r").rglob(".*.tmp"))


def test_every_byte_flip_or_truncation_is_caught_naming_the_file(tmp_path):
    """40 trials: a random shard (generate or filter output) damaged at a random place (1-16
    bytes flipped, or cut short); the next stage that reads it must name it, every time."""
    seed = random.randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    with FakeServer() as server:
        cfg = config(server.base_url)
        generate.main(cfg, tmp_path)
        filter_stage.main(cfg, tmp_path)
        answered = sum(server.successes.values())
        for trial in range(40):
            stage = rng.choice(["generate", "filter"])
            folder = tmp_path / stage
            target = rng.choice(sorted(folder.glob("*.parquet")))
            data = bytearray(target.read_bytes())
            if rng.random() < 0.25:
                data = data[:rng.randrange(len(data))]
            else:
                at = rng.randrange(len(data) - 16)
                for i in range(at, at + rng.randint(1, 16)):
                    data[i] ^= rng.randint(1, 255)
            target.write_bytes(bytes(data))
            quarantine = folder / "quarantine"
            before = len(list(quarantine.rglob(target.name)))
            if stage == "generate" and rng.random() < 0.5:
                # the next reader is the filter (made to run again)
                with pytest.raises(DamagedFile, match=target.name):
                    filter_stage.main(cfg, tmp_path, force=True)
                generate.main(cfg, tmp_path)
                filter_stage.main(cfg, tmp_path)
            else:
                # the stage's own up-to-date check reads its files: quarantined and redone
                (generate if stage == "generate" else filter_stage).main(cfg, tmp_path)
                if stage == "generate":
                    filter_stage.main(cfg, tmp_path)
            assert len(list(quarantine.rglob(target.name))) == before + 1, (trial, target)
            assert RunFolder(tmp_path).stage(stage).intact(
                RunFolder(tmp_path).stage(stage).manifest())
        # every remade generate shard came from the request cache: nothing paid twice
        assert sum(server.successes.values()) == answered
    every_row_once(tmp_path)


def test_two_writers_at_once_one_is_refused_with_the_holder_named(tmp_path):
    with FakeServer(delay=0.2) as server:
        # a timeout no loaded machine reaches: a request answered late but timed out would be
        # sent (and answered) twice, which is not what this test is about
        first = subprocess.Popen(args_for(tmp_path, server.base_url, "generate",
                                          "generate.request_timeout=60"), env=env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600  # an outer limit: the wait is on the lock file
        while not (tmp_path / "r" / "generate" / "lock.json").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        second = subprocess.run(args_for(tmp_path, server.base_url, "generate",
                                         "generate.temperature=1.1"),
                                env=env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"pid {first.pid}" in second.stderr and "being written by" in second.stderr
        assert second.stderr.count("\n") <= 3, second.stderr  # one line, no traceback
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    every_row_once(tmp_path / "r")
    assert max(server.successes.values()) == 1
    assert not (tmp_path / "r" / "generate" / "lock.json").exists()


@pytest.fixture(scope="module")
def traces_for_training(tmp_path_factory, embedded_path):
    """A small real run (the embedded teacher through transformers) up to the filter."""
    from stages.commands.cli import run_stages

    run = tmp_path_factory.mktemp("train-chaos") / "r"
    cfg = load_config("configs/demo.yaml", TRAIN)
    run_stages(["generate", "filter"], cfg, run)
    return run


TRAIN = ["generate.backend=hf", "generate.dtype=float32", "task.n_train=24",
         "generate.rows_per_shard=8", "generate.max_new_tokens=48", "generate.batch_size=8",
         "train.dtype=float32", "train.batch_size=2", "train.max_steps=8", "train.save_steps=1",
         "train.save_total_limit=3", "train.logging_steps=1"]


def test_train_killed_during_checkpoint_saves_resumes_from_the_last_complete_one(
        traces_for_training):
    import json

    run = traces_for_training
    cmd = [sys.executable, "-m", "stages.commands.cli", "train", "--config",
           "configs/demo.yaml", "--run", run.name, "--runs-dir", str(run.parent), *TRAIN]
    checkpoints = run / "train" / "checkpoints"
    kills = 0
    for target in (3, 6):  # kill inside a save: of checkpoint-3 (or a later one), then of 6
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            saving = [p for p in checkpoints.glob("checkpoint-*")
                      if int(p.name.split("-")[1]) >= target
                      and not (p / "complete.json").exists()]
            if saving:  # its save has begun and is not sealed yet
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        proc.wait()
    assert kills >= 1
    final = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr
    print(final.stderr)
    assert "resuming from" in final.stderr
    manifest = RunFolder(run).stage("train").manifest()
    assert manifest["counters"]["steps"] == 8
    steps = [json.loads(line)["step"] for line in (run / "train" / "log.jsonl").open()
             if "loss" in json.loads(line)]
    assert len(steps) == len(set(steps)), steps  # no step logged twice after the resumes
    assert sorted(steps) == list(range(1, 9))
