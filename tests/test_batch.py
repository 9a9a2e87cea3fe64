"""Batch mode (`generate.transport=batch`): the same shards as live mode at the batch price,
and nothing submitted twice whatever goes wrong.

The batch API is tests/fake_batch.py: the OpenAI Files and Batches endpoints on 127.0.0.1
with injected faults (a connection lost around the create, a kill between upload and submit
and between submit and download, a download cut short, a batch that expires, requests that
fail). It counts every upload and every batch made, so "submitted once" is checked against
the server. The file format against a real component, vLLM's batch runner, is the slow test
at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import stages.generate.stage as generate
from conftest import ROOT
from fake_batch import FakeBatchServer
from fake_openai import FakeServer
from pipeline.config import load_config
from pipeline.tasks import load_split
from stages.backends.openai_batch import BatchInterrupted, batch_line, read_lines, request_set

KEY = "sk-test-BATCHKEYMUSTNEVERBEWRITTEN0123456789"


def overrides(url: str, *more: str) -> list[str]:
    return ["task.n_train=24", "generate.rows_per_shard=8", "generate.n_samples=2",
            "generate.backend=openai", "generate.server_token_ids=true", "generate.model=fake",
            f"generate.base_url={url}", "generate.request_timeout=30",
            "generate.backoff_max=0.05", "generate.max_retries=2", "generate.top_k=4",
            "generate.price_input=2", "generate.price_output=8", "generate.transport=batch",
            "generate.batch_poll_seconds=0.05", *more]


def config(url: str, *more: str):
    return load_config("configs/demo.yaml", overrides(url, *more))


def records(run) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "generate" / "batches").glob(
        "*.json"))]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def no_key_on_disk(run) -> None:
    for path in run.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_the_input_file_is_the_live_request_with_its_extra_fields_merged():
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 2,
            "extra_body": {"return_tokens_as_token_ids": True}}
    line = batch_line("k1", body, "/v1/chat/completions")
    assert line == {"custom_id": "k1", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": "q"}],
                             "n": 2, "return_tokens_as_token_ids": True}}
    good, bad = read_lines('{"custom_id": "a"}\n\n{"custom_id": "b", "resp')
    assert [g["custom_id"] for g in good] == ["a"] and bad == 1
    assert request_set(["b", "a", "a"]) == request_set(["a", "b"])


def test_batch_mode_makes_the_live_shards_at_the_batch_price(tmp_path):
    with FakeServer() as live_server:
        live = generate.main(config(live_server.base_url, "generate.transport=live"),
                             tmp_path / "live")
    with FakeBatchServer(polls=2) as server:
        cfg = config(server.base_url)
        run = tmp_path / "batch"
        manifest = generate.main(cfg, run)
        assert [b["requests"] for b in server.submitted()] == [8, 8, 8]  # a batch per shard
        assert server.calls["upload"] == 3
        for name in ("traces-00000.parquet", "traces-00002.parquet"):
            a = pq.read_table(tmp_path / "live" / "generate" / name)
            b = pq.read_table(run / "generate" / name)
            assert a.drop(["prompt"]).equals(b.drop(["prompt"]))  # top-k included
        c, lc = manifest["counters"], live["counters"]
        assert c["traces"] == 48 and c["errors"] == 0
        assert (c["prompt_tokens"], c["completion_tokens"]) == (lc["prompt_tokens"],
                                                                lc["completion_tokens"])
        assert c["batch_tokens"] == c["prompt_tokens"] + c["completion_tokens"]
        assert c["cost"] == pytest.approx(lc["cost"] * 0.5)
        assert manifest["facts"]["usable_for_kd"]
        assert all(r["state"] == "downloaded" and r["answered"] == 8 for r in records(run))
        # done again: every answer from the cache, nothing uploaded or submitted
        generate.main(cfg, run, force=True)
        assert len(server.submitted()) == 3 and server.calls["upload"] == 3
        no_key_on_disk(run)


def test_a_create_whose_answer_is_lost_is_found_not_submitted_again(tmp_path):
    with FakeBatchServer(faults={"drop_create_after"}) as server:
        manifest = generate.main(config(server.base_url), tmp_path)
        assert manifest["counters"]["errors"] == 0
        assert len(server.submitted()) == 3 and server.calls["list"] >= 1


def test_a_create_that_never_reached_the_provider_is_submitted_on_the_rerun(tmp_path, capsys):
    with FakeBatchServer(faults={"drop_create_before"}) as server:
        cfg = config(server.base_url)
        with pytest.raises(BatchInterrupted, match="provider holds no batch of this request set"):
            generate.main(cfg, tmp_path)
        assert server.submitted() == [] and records(tmp_path)[0]["submitting"]
        manifest = generate.main(cfg, tmp_path)
        assert manifest["counters"]["errors"] == 0
        assert len(server.submitted()) == 3 and server.calls["upload"] == 3


def _distill(run, url: str, *more: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.commands.cli", "generate", "--config",
         "configs/demo.yaml", "--runs-dir", str(run.parent), "--run", run.name,
         *overrides(url, *more)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(what, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while not what():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)


def _killed_after_submitting(run, server) -> None:
    """`distill generate` in batch mode, SIGKILLed once its first batch is submitted."""
    child = _distill(run, server.base_url)
    try:
        _wait_for(lambda: any(r.get("batch_id") for r in records(run)))
    finally:
        _kill(child)


def test_a_kill_after_submitting_resumes_the_same_batch_by_its_id(tmp_path):
    run = tmp_path / "r"
    with FakeBatchServer(hold=True) as server:
        _killed_after_submitting(run, server)
        assert len(server.submitted()) == 1
        server.release()
        # even --force (the stage's output set aside) keeps the batch records where they are
        manifest = generate.main(config(server.base_url), run, force=True)
        assert manifest["counters"]["errors"] == 0
        assert len(server.submitted()) == 3 and server.calls["upload"] == 3


def test_a_damaged_batch_record_or_input_file_stops_the_stage_naming_it(tmp_path, capsys):
    """A record cut short, or an input file emptied, while its batch runs at the provider:
    one line naming the file, and nothing submitted again (an empty input file once made the
    same requests a new request set: paid twice)."""
    from stages.commands.cli import main as cli

    run = tmp_path / "r"
    args = ["generate", "--config", "configs/demo.yaml", "--runs-dir", str(tmp_path), "--run",
            "r", *overrides("URL")]
    with FakeBatchServer(hold=True) as server:
        args = [a.replace("URL", server.base_url) for a in args]
        _killed_after_submitting(run, server)
        record = sorted((run / "generate" / "batches").glob("*.json"))[0]
        whole = record.read_text()
        record.write_text(whole[:len(whole) // 2])
        capsys.readouterr()
        assert cli(args) == 1
        err = capsys.readouterr().err
        assert f"{record} is damaged (JSONDecodeError" in err and "nothing was submitted" in err
        record.write_text(whole)
        inputs = record.with_suffix(".jsonl")
        inputs.write_text("")
        assert cli(args) == 1
        err = capsys.readouterr().err
        assert f"{inputs} is damaged (0 requests where its record says 8)" in err
        assert len(server.submitted()) == 1 and server.calls["upload"] == 1
        assert "Traceback" not in err
        server.release()


def test_a_lost_record_of_a_running_batch_is_found_at_the_provider_not_submitted_again(
        tmp_path, capsys):
    run = tmp_path / "r"
    with FakeBatchServer(hold=True) as server:
        _killed_after_submitting(run, server)
        for path in (run / "generate" / "batches").iterdir():
            path.unlink()  # the records lost: only the provider knows the batch now
        server.release()
        manifest = generate.main(config(server.base_url), run)
        assert manifest["counters"]["errors"] == 0
        assert len(server.submitted()) == 3  # the running batch and the two other shards'
        assert "already holds request set" in capsys.readouterr().err


def test_a_submitted_batch_counts_at_its_worst_case_until_its_answers_are_stored(tmp_path):
    """Write-ahead in batch mode: a request set is recorded as spent (worst case) before its
    batch is made, so a rerun's budget counts a batch still running after a kill; its records
    close when the answers are stored."""
    from stages.backends.request_cache import RequestCache

    run = tmp_path / "r"

    def open_batch_requests() -> int:
        cache = RequestCache(run / "generate" / "requests.sqlite")
        try:
            return cache.unconfirmed()[True][0]
        finally:
            cache.db.close()

    with FakeBatchServer(hold=True) as server:
        _killed_after_submitting(run, server)
        assert open_batch_requests() == 8 and records(run)[0]["spending_recorded"]
        server.release()
        manifest = generate.main(config(server.base_url), run)
        assert manifest["counters"]["errors"] == 0 and len(server.submitted()) == 3
        assert open_batch_requests() == 0
        assert "unconfirmed" not in manifest["facts"]


def test_a_kill_between_upload_and_submit_submits_once(tmp_path):
    run = tmp_path / "r"
    with FakeBatchServer(faults={"hang_create"}, hold=True) as server:
        child = _distill(run, server.base_url)
        try:
            _wait_for(server.create_seen.is_set)
        finally:
            _kill(child)
        server.release()  # the hung create ends without a batch
        record = records(run)[0]
        assert record["input_file_id"] and record["submitting"] and "batch_id" not in record
        manifest = generate.main(config(server.base_url), run)
        assert manifest["counters"]["errors"] == 0
        assert len(server.submitted()) == 3
        assert server.calls["upload"] == 3  # the recorded upload was not repeated


def test_a_download_cut_short_is_downloaded_again(tmp_path, capsys):
    with FakeBatchServer(faults={"cut_download"}) as server:
        manifest = generate.main(config(server.base_url), tmp_path)
        assert manifest["counters"]["errors"] == 0 and manifest["counters"]["traces"] == 48
        assert "the download was cut short" in capsys.readouterr().err
        assert len(server.submitted()) == 3


def test_a_line_cut_on_every_download_fails_its_request_and_the_stage_finishes(tmp_path,
                                                                              capsys):
    """One output line cut in half on every download: that request is failed with its reason
    (for --retry-failed) after the tries, the rest are answered; a line for a request never
    asked is ignored and counted; the retry counter stops at its limit."""
    from stages.backends.openai_batch import DOWNLOAD_TRIES

    with FakeBatchServer(faults={"cut_line_always", "junk_line"}) as server:
        cfg = config(server.base_url, "generate.max_failed_share=0.5")
        manifest = generate.main(cfg, tmp_path)
        err = capsys.readouterr().err
        c = manifest["counters"]
        assert c["errors"] == 3 * 2 and c["traces"] == 48 - 3 * 2  # a request (2 samples) a batch
        assert f"({DOWNLOAD_TRIES + 1} of {DOWNLOAD_TRIES})" not in err
        assert f"({DOWNLOAD_TRIES} of {DOWNLOAD_TRIES})" in err
        assert err.count("1 result line(s) for requests this set never asked were ignored") == 3
        assert "could not be read in 3 downloads" in err
        assert len(server.submitted()) == 3
        # the failed requests go again with --retry-failed, a new batch of one per shard
        server.faults.clear()
        again = generate.main(cfg, tmp_path, retry_failed=True)
        assert again["counters"]["errors"] == 0 and len(server.submitted()) == 3 + 3


def test_a_look_at_the_batch_answered_with_a_web_page_is_retried(tmp_path, capsys):
    with FakeBatchServer(faults={"html_retrieve"}) as server:
        manifest = generate.main(config(server.base_url), tmp_path)
        assert manifest["counters"]["errors"] == 0 and len(server.submitted()) == 3
        assert "request_counts" not in capsys.readouterr().err


def test_expired_and_failed_requests_go_to_retry_failed_in_a_new_batch(tmp_path):
    # two questions fail, and the batch expires half done
    cfg = config("http://unused", "generate.rows_per_shard=24")
    questions = load_split(cfg.task, "train").column("question").to_pylist()
    with FakeBatchServer(faults={"expire"}, fail_prompts=tuple(questions[:2])) as server:
        cfg = config(server.base_url, "generate.rows_per_shard=24")
        with pytest.raises(RuntimeError, match="more than generate.max_failed_share"):
            generate.main(cfg, tmp_path)
        first = server.submitted()
        assert [b["requests"] for b in first] == [24]
        shard = pq.read_table(tmp_path / "generate" / "traces-00000.parquet")
        errors = [e for e in shard.column("error").to_pylist() if e]
        assert len(errors) == 2 * (12 + 2)  # 12 questions expired, 2 failed; 2 samples each
        assert sum("batch_expired" in e for e in errors) == 24
        assert sum("HTTP 400" in e and "[redacted]" in e for e in errors) == 4
        no_key_on_disk(tmp_path)  # the server's error echoed the key: scrubbed
    # the provider is well again: only the failed requests are submitted, in one new batch
    with FakeBatchServer() as server:
        failed_rows = len({r["id"] for r in shard.select(["id", "error"]).to_pylist()
                           if r["error"]})
        manifest = generate.main(config(server.base_url, "generate.rows_per_shard=24"),
                                 tmp_path, retry_failed=True)
        assert [b["requests"] for b in server.submitted()] == [failed_rows]
        assert manifest["counters"]["errors"] == 0 and manifest["counters"]["traces"] == 48
        no_key_on_disk(tmp_path)


def test_a_batch_that_fails_validation_is_every_row_an_error(tmp_path):
    with FakeBatchServer(faults={"fail"}) as server:
        with pytest.raises(RuntimeError, match="max_failed_share"):
            generate.main(config(server.base_url), tmp_path)
        shard = pq.read_table(tmp_path / "generate" / "traces-00000.parquet")
        assert set(shard.column("error").to_pylist()) == {
            "the batch failed: invalid_request: the input file is not valid"}


def test_a_budget_below_a_batch_stops_before_submitting_it(tmp_path):
    with FakeBatchServer() as server:
        with pytest.raises(Exception, match=r"next batch \(8 requests\) could cost"):
            generate.main(config(server.base_url, "generate.budget=0.001"), tmp_path)
        assert server.submitted() == [] and server.calls["upload"] == 0


def test_eval_asks_an_api_teacher_live_outside_the_generate_budget(tmp_path):
    from stages.eval import stage as eval_stage

    with FakeServer() as server:  # a live server only: a batch would find no Batches API
        cfg = config(server.base_url, "task.n_test=5", "eval.n=5", "eval.systems=[teacher]",
                     "generate.budget_tokens=1")
        report = eval_stage.main(cfg, tmp_path)
        assert sum(server.successes.values()) == 5
    assert report["results"][0]["n"] == 5
    assert not (tmp_path / "eval" / "batches").exists()


def test_kills_right_after_downloads_never_let_the_bill_pass_the_budget(tmp_path):
    """Batch mode under the live kill loop's faults: SIGKILL right after an output file was
    sent (its batch billed, its answers not yet stored), five times, each rerun with the same
    budget, with a round and a hinted round: a request set counts at its worst case from
    before its batch is made until its answers are stored, so the provider's bill stays
    within the budget and the ledger (confirmed + unconfirmed) never falls below it."""
    from pipeline.costs import Prices
    from stages.backends.request_cache import RequestCache

    short = ["generate.max_new_tokens=8", "generate.max_samples=4",
             "generate.hint_template=data/prompts/add_subtract_hint.txt"]
    prices = Prices(2, 8, 0.5)
    with FakeBatchServer() as server:
        generate.main(config(server.base_url, *short), tmp_path / "full")
        assert len(server.submitted()) > 3  # the first round, round 2 and the hinted round
        total = sum(prices.cost(p, c, True) for p, c in server.billed)
    cap = total * 0.9
    run = tmp_path / "r"
    # a provider of its own: the first one would hand the same request sets' batches back
    with FakeBatchServer() as server:
        kills = 0
        for _ in range(5):
            before = server.calls["download_output"]
            child = _distill(run, server.base_url, *short, f"generate.budget={cap}")
            _wait_for(lambda: server.calls["download_output"] > before
                      or child.poll() is not None)
            if child.poll() is None:
                _kill(child)
                kills += 1
            child.wait()
        assert kills >= 1
        _distill(run, server.base_url, *short, f"generate.budget={cap}").wait(120)
        billed = sum(prices.cost(p, c, True) for p, c in server.billed)
        assert 0 < billed <= cap
        cache = RequestCache(run / "generate" / "requests.sqlite")
        confirmed = sum(prices.cost(p, c, True) for p, c in cache.totals().values())
        unconfirmed = sum(prices.cost(p, c, True) for _, p, c in cache.unconfirmed().values())
        cache.db.close()
        assert confirmed + unconfirmed >= billed - 1e-12  # sums in another order
        assert len({b["id"] for b in server.submitted()}) == len(server.submitted())
