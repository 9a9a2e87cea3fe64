"""Paid-for work is never lost or silently trusted: checksums on read, one writer per stage,
settings changes that keep work, failed rows retried alone, keys that never leak.

The teacher is an OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py) that counts
every request it answers, so "no request is sent twice" is checked against the server itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
from fake_openai import FakeServer
from pipeline.config import load_config
from pipeline.lock import StageLock, StageLocked
from pipeline.kept_aside import LOCK
from pipeline.run_folder import DamagedFile, RunFolder
from pipeline.schema import logical, shard_format
from pipeline.secrets import remember, scrub
from stages.backends.base import TeacherUnavailable

KEY = "sk-test-THISKEYMUSTNEVERBEWRITTEN0123456789"


def config(url: str, *more: str):
    return load_config("configs/demo.yaml", [
        "task.n_train=24", "generate.rows_per_shard=8", "generate.n_samples=1",
        "generate.backend=openai", "generate.server_token_ids=true", "generate.model=fake",
        f"generate.base_url={url}", "generate.request_timeout=30", "generate.backoff_max=0.05",
        "generate.max_retries=1", "generate.concurrency=4", "generate.top_k=4", *more])


def sent(server) -> int:
    return sum(server.successes.values())


def flip(path, at: float = 0.5, n: int = 16) -> None:
    """Flip `n` bytes in the middle of a file (same size)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_generate_shard_is_caught_by_the_filter_quarantined_and_remade_alone(
        tmp_path):
    with FakeServer() as server:
        cfg = config(server.base_url)
        generate.main(cfg, tmp_path)
        assert sent(server) == 24
        shard = tmp_path / "generate" / "traces-00001.parquet"
        flip(shard)
        with pytest.raises(DamagedFile, match="traces-00001.parquet is damaged: its sha256"):
            filter_stage.main(cfg, tmp_path)
        assert not shard.exists()
        moved = list((tmp_path / "generate" / "quarantine").rglob("traces-00001.parquet"))
        assert len(moved) == 1 and moved[0].stat().st_size > 0  # kept, never deleted
        assert RunFolder(tmp_path).stage("generate").manifest() is None
        # generate remakes that shard only, from the request cache: nothing is paid twice
        manifest = generate.main(cfg, tmp_path)
        assert manifest["shards_written"] == 1 and manifest["shards_reused"] == 2
        assert sent(server) == 24
        assert filter_stage.main(cfg, tmp_path)["counters"]["traces_in"] == 24


def test_a_flipped_shard_is_found_by_the_up_to_date_check_and_redone_alone(tmp_path):
    with FakeServer() as server:
        cfg = config(server.base_url)
        generate.main(cfg, tmp_path)
        flip(tmp_path / "generate" / "traces-00002.parquet", at=0.3)
        built = []
        manifest = generate.main(cfg, tmp_path, teacher=lambda: built.append(1) or
                                 generate.teacher_factory(cfg, RunFolder(tmp_path)
                                                          .stage("generate"))())
        assert built and manifest["shards_written"] == 1
        assert sent(server) == 24


def test_a_truncated_kept_shard_is_caught_by_train_with_the_file_named(tmp_path):
    import stages.train.stage as train

    with FakeServer() as server:
        cfg = config(server.base_url, "filter.require_answer_marker=false",
                     "filter.min_steps=0", "filter.min_tokens=1", "filter.min_words=1")
        generate.main(cfg, tmp_path)
        filter_stage.main(cfg, tmp_path)
    kept = tmp_path / "filter" / "kept-00000.parquet"
    kept.write_bytes(kept.read_bytes()[:-100])
    with pytest.raises(DamagedFile, match=r"kept-00000.parquet is damaged: \d+ bytes where"):
        train.main(cfg, tmp_path)
    assert RunFolder(tmp_path).stage("filter").manifest() is None


def test_changing_a_setting_and_back_is_up_to_date_at_once_with_no_request_sent(tmp_path):
    with FakeServer() as server:
        cfg = config(server.base_url)
        first = generate.main(cfg, tmp_path)
        hot = config(server.base_url, "generate.temperature=1.3")
        generate.main(hot, tmp_path)
        assert sent(server) == 48  # other sampling settings are other requests
        aside = tmp_path / "generate" / "by-fingerprint" / first["fingerprint"]
        assert len(list(aside.glob("traces-*.parquet"))) == 3
        built = []
        back = generate.main(cfg, tmp_path, teacher=lambda: built.append(1))
        assert not built, "the teacher must not even be loaded"
        assert back["fingerprint"] == first["fingerprint"] and sent(server) == 48
        # --force redoes the stage without paying again: the responses are in the cache
        folder = RunFolder(tmp_path).stage("generate")
        before = folder.read_tables(back["files"]).replace_schema_metadata(None)
        forced = generate.main(cfg, tmp_path, force=True)
        assert forced["shards_written"] == 3 and sent(server) == 48
        assert folder.read_tables(forced["files"]).replace_schema_metadata(None).equals(before)
        # the output of both settings and the forced-away copy are kept, until gc
        from stages.commands.gc import gc

        kept = RunFolder(tmp_path).kept_aside()
        assert len(kept) == 2
        import io

        out = io.StringIO()
        would = gc(RunFolder(tmp_path), out=out)
        assert would > 0 and "--yes" in out.getvalue()
        assert len(RunFolder(tmp_path).kept_aside()) == 2
        assert gc(RunFolder(tmp_path), yes=True, out=out) == would
        assert RunFolder(tmp_path).kept_aside() == []
        assert RunFolder(tmp_path).stage("generate").manifest()["files"] == forced["files"]


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    folder = RunFolder(tmp_path).stage("generate")
    with StageLock(folder):
        with pytest.raises(StageLocked) as refused:
            StageLock(folder).acquire()
        line = str(refused.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in line
        assert "remove" in line and "lock.json" in line
        with FakeServer() as server:
            with pytest.raises(StageLocked):
                generate.main(config(server.base_url), tmp_path)
            assert sent(server) == 0
    assert not (tmp_path / "generate" / LOCK).exists()


def test_a_stale_lock_is_broken(tmp_path):
    folder = RunFolder(tmp_path).stage("generate")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder.write_json(LOCK, {"host": socket.gethostname(), "pid": dead.pid, "started": 0,
                             "renewed": time.time(), "lease_s": 3600})
    with StageLock(folder):  # its process is gone
        pass
    folder.write_json(LOCK, {"host": "elsewhere", "pid": 1, "started": 0,
                             "renewed": time.time() - 100, "lease_s": 30})
    with StageLock(folder):  # its lease ran out (a holder killed on another machine)
        pass
    folder.write_json(LOCK, {"host": "elsewhere", "pid": 1, "started": 0,
                             "renewed": time.time(), "lease_s": 30})
    with pytest.raises(StageLocked, match="host elsewhere, pid 1"):
        StageLock(folder).acquire()


def test_a_lock_taken_over_is_noticed_before_committing(tmp_path):
    folder = RunFolder(tmp_path).stage("generate")
    lock = StageLock(folder, lease_s=0.2)
    lock.acquire()
    try:
        folder.write_json(LOCK, {"host": "elsewhere", "pid": 1, "token": "other",
                                 "renewed": time.time(), "lease_s": 30})
        time.sleep(0.3)
        with pytest.raises(StageLocked, match="taken over"):
            lock.check()
    finally:
        lock.release()
    assert folder.read_json(LOCK)["token"] == "other"  # not ours: left alone


def test_a_rejected_key_stops_the_stage_and_the_key_is_nowhere(tmp_path, monkeypatch,
                                                                capsys):
    from stages.commands.cli import main

    monkeypatch.setenv("TEST_TEACHER_KEY", KEY)
    with FakeServer(default="401") as server:
        code = main(["generate", "--config", "configs/demo.yaml", "--run", "r", "--runs-dir",
                     str(tmp_path), "task.n_train=24", "generate.rows_per_shard=8",
                     "generate.backend=openai", "generate.model=fake",
                     "generate.api_key_env=TEST_TEACHER_KEY",
                     f"generate.base_url={server.base_url}"])
        assert sum(server.attempts.values()) <= 16  # stopped at once, not 24 rows x retries
    err = capsys.readouterr().err
    assert code == 1
    assert "rejected the API key (401 Unauthorized)" in err and "$TEST_TEACHER_KEY" in err
    assert KEY not in err and KEY[8:30] not in err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_missing_model_stops_the_stage(tmp_path):
    with FakeServer(default="404") as server:
        with pytest.raises(TeacherUnavailable, match=r"not found \(404\).*generate.model='fake'"):
            generate.main(config(server.base_url), tmp_path)


def test_too_many_failed_rows_stop_the_stage_and_retry_failed_resends_only_them(tmp_path):
    from pipeline.tasks import load_split

    cfg = config("http://unused")
    rows = load_split(cfg.task, "train").to_pylist()[:24]
    prompts = [generate.PromptTemplate(cfg.generate.prompt_template).render(r["question"])
               for r in rows]
    bad = prompts[3:6] + prompts[17:18]  # 4 of 24 rows fail (17%): shards 0 and 2
    scripts = {p: ["500", "500"] for p in bad}
    with FakeServer(scripts) as server:
        cfg = config(server.base_url)
        # the first run writes format 1 (as before format 2), the retry format 2
        with pytest.raises(RuntimeError, match=r"4 of 24 traces \(17%\) ended with an error.*"
                           r"--retry-failed"):
            generate.main(config(server.base_url, "generate.shard_format=1"), tmp_path)
        assert RunFolder(tmp_path).stage("generate").manifest() is None
        assert sent(server) == 20
        manifest = generate.main(cfg, tmp_path, retry_failed=True)
        assert sent(server) == 24 and max(server.successes.values()) == 1
        assert manifest["counters"]["errors"] == 0 and manifest["counters"]["traces"] == 24
        assert manifest["shards_written"] == 2 and manifest["shards_reused"] == 1
        folder = RunFolder(tmp_path).stage("generate")
        assert [shard_format(folder.read_checked(e).schema) for e in manifest["files"]] == [
            2, 1, 2]  # the retried shards merged their format-1 rows into format 2
        table = folder.read_tables(manifest["files"], each=logical)
        assert table.column("id").to_pylist() == [r["id"] for r in rows]
        assert table.column("error").null_count == 24
        assert all(len(r) == len(t) for r, t in zip(table.column("topk_ids").to_pylist(),
                                                     table.column("token_ids").to_pylist()))
        # the failed versions of the two shards are kept aside, not overwritten
        aside = list((tmp_path / "generate" / "by-fingerprint").rglob("traces-*.parquet"))
        assert sorted(p.name for p in aside) == ["traces-00000.parquet", "traces-00002.parquet"]


def test_few_failed_rows_are_accepted_under_the_threshold(tmp_path):
    with FakeServer({}) as server:
        cfg = config(server.base_url, "generate.max_failed_share=0.5")
        server.scripts.update({p: ["400"] for p in list(_prompts(cfg))[:2]})
        manifest = generate.main(cfg, tmp_path)
        assert manifest["counters"]["errors"] == 2


def _prompts(cfg):
    from pipeline.tasks import load_split

    template = generate.PromptTemplate(cfg.generate.prompt_template)
    return [template.render(r["question"]) for r in load_split(cfg.task, "train").to_pylist()]


def test_error_texts_are_scrubbed_of_keys():
    remember("my-very-own-secret-value")
    text = ("Incorrect API key provided: sk-proj-abcdefghijklmnop1234. Authorization: Bearer "
            "abc.def-ghi_jkl0123 and api_key=zzzzzzzzzz, also my-very-own-secret-value; "
            "sha256 0f3a9e2c and max_tokens=160 stay")
    clean = scrub(text)
    for secret in ("sk-proj-abcdefghijklmnop1234", "abc.def-ghi_jkl0123", "zzzzzzzzzz",
                   "my-very-own-secret-value"):
        assert secret not in clean
    assert "sha256 0f3a9e2c" in clean and "max_tokens=160" in clean


def test_orphan_temporary_files_are_cleaned_at_the_next_start(tmp_path):
    with FakeServer() as server:
        cfg = config(server.base_url)
        generate.main(cfg, tmp_path)
        orphan = tmp_path / "generate" / ".traces-00001.parquet.abc123.tmp"
        orphan.write_bytes(b"half a shard")
        generate.main(cfg, tmp_path)
        assert not orphan.exists()


def test_a_full_disk_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import errno

    import pipeline.files as rf
    from stages.commands.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(rf, "write_whole", full)
    code = main(["filter", "--config", "configs/demo.yaml", "--run", "r", "--runs-dir",
                 str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: No space left on device (") and "run the same command" in err
    assert len(err.strip().splitlines()) == 1


def test_an_incomplete_checkpoint_is_skipped_and_said(tmp_path):
    from pipeline.sealed import last_complete_checkpoint, seal

    said = []
    good = tmp_path / "checkpoint-2"
    good.mkdir()
    (good / "adapter_model.safetensors").write_bytes(b"weights")
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    seal(good)
    cut = tmp_path / "checkpoint-4"  # killed while saving: weights there, the rest not
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"wei")
    damaged = tmp_path / "checkpoint-3"  # sealed, then a byte changed
    damaged.mkdir()
    (damaged / "optimizer.pt").write_bytes(b"state")
    seal(damaged)
    (damaged / "optimizer.pt").write_bytes(b"stat!")
    assert last_complete_checkpoint(tmp_path, said.append) == str(good)
    assert not cut.exists() and not damaged.exists()
    assert "checkpoint-4 is incomplete" in said[0] and "optimizer.pt is not as saved" in said[1]


def test_a_full_request_cache_stops_the_stage_instead_of_failing_rows(tmp_path):
    from stages.backends.openai_api import OpenAIBackend

    with FakeServer() as server:
        cfg = config(server.base_url)
        backend = OpenAIBackend(cfg.generate, tmp_path / "requests.sqlite")
        pages = backend.cache.db.execute("PRAGMA page_count").fetchone()[0]
        backend.cache.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's disk is full
        settings = generate.SamplingSettings(n=1, temperature=0.5, top_p=1.0, max_new_tokens=5,
                                             top_k=4, seed=0, stop=[])
        from stages.backends.base import generate_in_batches

        with pytest.raises(OSError, match="request cache cannot be written.*full"):
            generate_in_batches(backend, ["q1", "q2"], settings, 2)
        backend.close()
