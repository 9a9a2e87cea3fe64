"""Paying for a teacher: the ledger (tokens and cost per shard, round, kept trace, covered
question), the estimate before spending, and the budget that stops in time.

The teacher is the OpenAI-compatible test server (tests/fake_openai.py), which reports usage
(prompt tokens: one per 4 bytes; completion tokens: the tokens it returned) and counts every
request it answers, so "no request is sent twice" is checked against the server itself."""

from __future__ import annotations

import os

import json
import math
import re

import pytest

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
from fake_openai import FakeServer
from pipeline.config import ConfigError, load_config
from pipeline.costs import Prices, ledger, ledger_lines, money
from pipeline.prompts import PromptTemplate
from pipeline.tasks import load_split
from stages.backends.base import BudgetReached
from stages.backends.request_cache import RequestCache
from stages.commands.cli import main as cli
from stages.generate.estimate import estimate, lines
from test_paid_work import sent
from test_report import CHROMIUM, _browser_dom

PRICES = ["generate.price_input=2.5", "generate.price_output=10"]


def overrides(url: str, *more: str) -> list[str]:
    return ["task.n_train=24", "generate.rows_per_shard=8", "generate.n_samples=2",
            "generate.backend=openai", "generate.server_token_ids=true", "generate.model=fake",
            f"generate.base_url={url}", "generate.request_timeout=30",
            "generate.backoff_max=0.05", "generate.max_retries=1", "generate.concurrency=4",
            "generate.top_k=4", *more]


def config(url: str, *more: str):
    return load_config("configs/demo.yaml", overrides(url, *more))


def served_usage(tmp_path) -> tuple[int, int]:
    """What the server billed, summed from the responses in the request cache."""
    cache = RequestCache(tmp_path / "generate" / "requests.sqlite")
    rows = cache.db.execute("SELECT body FROM responses").fetchall()
    cache.db.close()
    bodies = [json.loads(b)["usage"] for (b,) in rows]
    return (sum(u["prompt_tokens"] for u in bodies), sum(u["completion_tokens"] for u in bodies))


def test_prices_and_the_ledger_in_words():
    p = Prices(input=2.5, output=10, batch_discount=0.5, hour=2.0)
    assert p.cost(1_000_000, 0) == 2.5 and p.cost(0, 1_000_000) == 10
    assert p.cost(1_000_000, 1_000_000, batch=True) == pytest.approx(6.25)
    assert p.cost(0, 0, seconds=1800) == pytest.approx(1.0)
    assert money(0.000123456) == "0.000123" and money(12.345) == "12.35" and money(0) == "0"
    book = {"total": {"prompt_tokens": 1000, "completion_tokens": 500, "cost": 0.5,
                      "batch_tokens": 0, "engine_s": 0}, "prices": {"priced": True}}
    said = ledger_lines(book, kept=10, covered=4)
    assert said[0] == "teacher usage: 1,000 prompt + 500 completion tokens"
    assert said[1] == "teacher cost: 0.5 in all, 0.05 per kept trace, 0.125 per covered question"
    assert ledger_lines(None) == [] and ledger_lines({"total": {}}) == []


def test_the_ledger_counts_every_response_down_to_the_kept_trace(tmp_path, capsys):
    with FakeServer() as server:
        cfg = config(server.base_url, *PRICES)
        manifest = generate.main(cfg, tmp_path)
        prompt, completion = served_usage(tmp_path)
        c = manifest["counters"]
        assert (c["prompt_tokens"], c["completion_tokens"]) == (prompt, completion) != (0, 0)
        assert c["cost"] == pytest.approx((prompt * 2.5 + completion * 10) / 1e6)
        assert c["requests"] == 24 and c["cached"] == 0
        shard = manifest["shards"][0]["counters"]
        assert 0 < shard["cost"] < c["cost"] and shard["prompt_tokens"] > 0
        book = json.loads((tmp_path / "generate" / "ledger.json").read_text())
        assert book["total"]["cost"] == pytest.approx(c["cost"])
        assert book["prices"]["input"] == 2.5
        out = capsys.readouterr().err
        assert f"teacher usage: {prompt:,} prompt + {completion:,} completion tokens" in out
        assert "requests: 24 sent, 0 answered from the request cache" in out

        # the filter turns it into cost per kept trace and per covered question
        filt = filter_stage.main(cfg, tmp_path)
        kept, covered = filt["counters"]["kept"], filt["counters"]["covered"]
        funnel = json.loads((tmp_path / "filter" / "funnel.json").read_text())
        assert (f"teacher cost: {money(c['cost'])} in all, {money(c['cost'] / max(1, kept))} "
                f"per kept trace, {money(c['cost'] / max(1, covered))} per covered question"
                ) in funnel["coverage"]
        assert "teacher cost:" in (tmp_path / "filter" / "README.md").read_text()

        # `make report` shows the ledger, as a person sees it
        if CHROMIUM:
            assert cli(["report", "--run", tmp_path.name, "--runs-dir",
                        str(tmp_path.parent)]) == 0
            dom = _browser_dom(tmp_path / "report.html")
            assert "Teacher ledger" in dom and "teacher cost:" in dom
            assert re.search(r"<td>all</td><td[^>]*>24</td><td[^>]*>0</td><td[^>]*>"
                             rf"{prompt}</td><td[^>]*>{completion}</td>", dom)

        # a redo from the cache: the data cost the same, nothing is sent
        again = generate.main(cfg, tmp_path, force=True)
        assert sent(server) == 24
        assert again["counters"]["cost"] == pytest.approx(c["cost"])
        assert again["counters"]["requests"] == 0 and again["counters"]["cached"] == 24


def test_a_server_without_usage_is_counted_by_its_tokens(tmp_path, capsys):
    with FakeServer(usage=False) as server:
        manifest = generate.main(config(server.base_url, *PRICES), tmp_path)
        c = manifest["counters"]
        assert c["usage_estimated"] == 24
        assert c["completion_tokens"] == c["tokens"] > 0 and c["prompt_tokens"] > 0
        # no tokenizer was set: the notice says how the prompts were counted instead
        assert c["usage_by_bytes"] == 24
        said = capsys.readouterr().err
        assert "prompt tokens of 24 of them are estimated as UTF-8 bytes / 4" in said
        assert "counted by the teacher's tokenizer" not in said


def test_kills_right_after_answers_never_let_the_bill_pass_the_budget(tmp_path):
    """SIGKILL just after the server has sent answers that were not yet stored, five times,
    each rerun with the same budget: the write-ahead record counts every request sent without
    a stored answer at its worst case, so the server's bill stays within the budget and the
    ledger (confirmed + unconfirmed) never falls below the bill."""
    import signal
    import subprocess
    import sys
    import time

    # a worst case near the real cost (room for kills); a round and a hinted round, whose
    # requests go the same way (the fake teacher's answers are wrong: every question is short)
    short = ["generate.max_new_tokens=8", "generate.max_samples=4",
             "generate.hint_template=data/prompts/add_subtract_hint.txt"]
    with FakeServer(delay=0.3) as server:
        generate.main(config(server.base_url, *PRICES, *short), tmp_path / "full")
        paid = RequestCache(tmp_path / "full" / "generate" / "requests.sqlite")
        total = sum(Prices(2.5, 10).cost(p, c) for p, c in paid.totals().values())
        paid.db.close()
        assert len(server.billed) > 24 * 2  # the first round, round 2 and the hinted round
        server.billed.clear()
        cap = total * 0.9
        args = [sys.executable, "-m", "stages.commands.cli", "generate", "--config",
                "configs/demo.yaml", "--run", "r", "--runs-dir", str(tmp_path),
                *overrides(server.base_url, *PRICES, *short, f"generate.budget={cap}")]
        kills = 0
        for _ in range(5):
            before = len(server.billed)
            child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while len(server.billed) < before + 4 and child.poll() is None:
                time.sleep(0.01)
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
            child.wait()
        assert kills >= 1
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # answers sent into a dead pipe are billed all the same
        prices = Prices(2.5, 10)
        billed = sum(prices.cost(p, c) for p, c in server.billed)
        assert 0 < billed <= cap
        cache = RequestCache(tmp_path / "r" / "generate" / "requests.sqlite")
        confirmed = sum(prices.cost(p, c) for p, c in cache.totals().values())
        unconfirmed = sum(prices.cost(p, c) for _, p, c in cache.unconfirmed().values())
        cache.db.close()
        assert unconfirmed > 0 and confirmed + unconfirmed >= billed


def test_the_ledger_says_the_unconfirmed_part_apart_and_bounds_the_bill():
    unconfirmed = {"requests": 3, "prompt_tokens": 900, "completion_tokens": 48, "cost": 0.0027}
    manifests = [("generate", {"counters": {"prompt_tokens": 1000, "completion_tokens": 100,
                                            "cost": 0.0035},
                               "facts": {"unconfirmed": {**unconfirmed, "requests": 1}}}),
                 ("generate-round-2", {"counters": {"prompt_tokens": 500, "completion_tokens": 50,
                                                    "cost": 0.00175},
                                       "facts": {"unconfirmed": unconfirmed}})]
    book = ledger(manifests)
    assert book["unconfirmed"] == unconfirmed  # one cache for all rounds: its latest count
    assert book["bill_at_most"] == pytest.approx(0.0035 + 0.00175 + 0.0027)
    said = "\n".join(ledger_lines(book))
    assert "teacher cost: 0.00525 in all" in said
    assert "unconfirmed: 3 request(s) sent without an answer stored" in said
    assert "the bill is at most 0.00795" in said
    assert "unconfirmed" not in ledger([(n, {"counters": m["counters"]})
                                        for n, m in manifests])


def test_a_budget_stops_before_passing_and_a_higher_one_finishes_with_nothing_sent_twice(
        tmp_path, capsys):
    with FakeServer() as server:
        full = tmp_path / "full"
        generate.main(config(server.base_url, *PRICES), full)
        total = generate.main(config(server.base_url, *PRICES), full)["counters"]["cost"]
        server.successes.clear()

        run = tmp_path / "capped"
        cap = total * 0.6
        cfg = config(server.base_url, *PRICES, f"generate.budget={cap}")
        with pytest.raises(BudgetReached, match=r"generate.budget=.* is reached: .* spent, and "
                           r"the next request could cost up to .*Raise the budget"):
            generate.main(cfg, run)
        paid = RequestCache(run / "generate" / "requests.sqlite")
        spent = sum(Prices(2.5, 10).cost(p, c) for p, c in paid.totals().values())
        paid.db.close()
        assert 0 < spent <= cap  # stopped in time
        # and not before it had to: the next request's worst case no longer fits beside what
        # was spent (the worst cases of requests in flight were waited out, not counted)
        template = PromptTemplate(cfg.generate.prompt_template)
        worst = max(Prices(2.5, 10).cost(len(template.render(q).encode()) + 32,
                                         2 * cfg.generate.max_new_tokens)
                    for q in load_split(cfg.task, "train").column("question").to_pylist())
        assert spent + worst > cap
        assert sent(server) < 24
        assert (run / "generate" / "traces-00000.parquet").exists()  # finished work is kept
        first = sent(server)

        # the command line says it in one line
        code = cli(["generate", "--config", "configs/demo.yaml", "--runs-dir", str(tmp_path),
                    "--run", "capped", *overrides(server.base_url, *PRICES,
                                                   f"generate.budget={cap}")])
        assert code == 1 and sent(server) == first
        err = capsys.readouterr().err
        assert "error: generate.budget=" in err and "Traceback" not in err

        manifest = generate.main(config(server.base_url, *PRICES,
                                        f"generate.budget={total * 2}"), run)
        assert sent(server) == 24  # every request once, over both runs
        assert manifest["counters"]["cost"] == pytest.approx(total)


def test_a_token_budget_stops_too(tmp_path):
    with FakeServer() as server:
        cfg = config(server.base_url, "generate.budget_tokens=2000")
        with pytest.raises(BudgetReached, match="generate.budget_tokens=2,000 is reached"):
            generate.main(cfg, tmp_path)
        paid = RequestCache(tmp_path / "generate" / "requests.sqlite")
        assert 0 < sum(p + c for p, c in paid.totals().values()) <= 2000
        paid.db.close()


def test_budget_settings_are_checked():
    with pytest.raises(ConfigError, match="generate.budget=5 needs prices"):
        load_config("configs/demo.yaml", ["generate.backend=openai", "generate.budget=5"])
    with pytest.raises(ConfigError, match="applies to an API teacher"):
        load_config("configs/demo.yaml", ["generate.budget_tokens=5"])
    with pytest.raises(ConfigError, match="applies to an API teacher"):
        load_config("configs/demo.yaml", ["generate.transport=batch"])


def test_the_estimate_sends_nothing_or_a_pilot_the_run_reuses(tmp_path, capsys):
    with FakeServer() as server:
        cfg = config(server.base_url, *PRICES)
        e = estimate(cfg, generate.RunFolder(str(tmp_path)))
        assert sent(server) == 0
        assert e["requests"] == 24 and e["samples"] == 48 and e["cached_requests"] == 0
        assert e["completion_tokens"] == 48 * cfg.generate.max_new_tokens
        assert e["cost"] == pytest.approx(Prices(2.5, 10).cost(e["prompt_tokens"],
                                                               e["completion_tokens"]))
        assert "pilot" not in " ".join(lines(e, cfg))
        # --estimate after the overrides; asking without a pilot leaves no folder behind
        assert cli(["generate", "--config", "configs/demo.yaml", "--runs-dir", str(tmp_path),
                    "--run", "asked", *overrides(server.base_url, *PRICES), "--estimate"]) == 0
        assert "requests: 24" in capsys.readouterr().out and sent(server) == 0
        assert not (tmp_path / "asked").exists()

        code = cli(["generate", "--estimate", "--config", "configs/demo.yaml", "--runs-dir",
                    str(tmp_path), "--run", "est",
                    *overrides(server.base_url, *PRICES, "generate.pilot_questions=4")])
        assert code == 0 and sent(server) == 4
        out = capsys.readouterr().out
        assert "requests: 24 (one per question, 2 sample(s) each: 48 traces)" in out
        assert "pilot: 4 questions, 8 traces" in out
        assert "per kept trace" in out and "completion tokens:" in out

        # the run answers the pilot's questions from the cache: never paid twice
        run = tmp_path / "est"
        manifest = generate.main(cfg, run)
        assert sent(server) == 24 and manifest["counters"]["cached"] == 4
        again = estimate(cfg, generate.RunFolder(str(run)))
        assert again["cached_requests"] == 24 and again["cost_to_send"] == 0


class _Tokenizer:
    """Counts one token per word, like a tokenizer's `__call__`."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_a_local_engine_records_its_tokens_and_engine_time_at_its_hourly_price():
    import numpy as np
    import pyarrow as pa

    from pipeline.prompts import PromptTemplate
    from pipeline.stage import Shard
    from stages.backends.base import Generation

    class Engine:
        tokenizer = _Tokenizer()
        stats = {"engine_s": 0.0}

        def render(self, prompt):
            return prompt

        def facts(self):
            return {"backend": "engine"}

        def generate(self, prompts, settings):
            self.stats["engine_s"] += 36.0  # an engine that takes 36 s per call
            gen = Generation("1 + 1 = 2. The answer is 2.", "stop", np.arange(4, dtype=np.int32),
                             np.zeros(4, np.float32), np.zeros((4, 2), np.int32),
                             np.zeros((4, 2), np.float32))
            return [[gen] * settings.n for _ in prompts]

    cfg = load_config("configs/demo.yaml", ["generate.n_samples=2", "generate.top_k=2",
                                            "generate.price_hour=3.0", "generate.batch_size=64"])
    template = PromptTemplate(cfg.generate.prompt_template)
    rows = pa.table({"id": ["a", "b"], "question": ["Anna has 2 apples.", "Ben has 3."],
                     "gold": ["2", "3"]})
    out = generate.generate_shard(generate.GenerateSettings(cfg.generate, template),
                                  Shard.of("00000", rows), Engine())
    c = out.counters
    words = sum(len(template.render(q).split()) for q in ["Anna has 2 apples.", "Ben has 3."])
    assert c["prompt_tokens"] == words and c["completion_tokens"] == 16
    assert c["engine_s"] == 36.0 and c["cost"] == pytest.approx(36 * 3.0 / 3600)


def test_config_keys_lists_the_price_budget_and_batch_settings(capsys):
    assert cli(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("price_input", "price_output", "batch_discount", "price_hour", "budget",
                "budget_tokens", "transport", "batch_window", "batch_poll_seconds",
                "pilot_questions"):
        assert f"  generate.{key} = " in out, key


def test_the_ledger_adds_up_every_round(tmp_path, capsys):
    # the test server's answers are seldom right: the questions without a kept trace are
    # sampled again in round 2
    with FakeServer() as server:
        cfg = config(server.base_url, *PRICES, "generate.max_samples=4")
        first = generate.main(cfg, tmp_path)
        book = json.loads((tmp_path / "generate" / "ledger.json").read_text())
        assert [r["round"] for r in book["rounds"]] == ["generate", "generate-round-2"]
        second = book["rounds"][1]
        assert second["requests"] == 23 and second["cost"] > 0  # one question was covered
        assert book["total"]["cost"] == pytest.approx(first["counters"]["cost"]
                                                      + second["cost"])
        assert sent(server) == 47
        assert "teacher cost:" in capsys.readouterr().err  # the rounds' total, said
        filt = filter_stage.main(cfg, tmp_path)
        assert filt["facts"]["ledger"]["total"]["cost"] == pytest.approx(book["total"]["cost"])


def test_a_budget_needs_one_process_on_a_local_run_folder():
    cfg = config("http://127.0.0.1:9/v1", *PRICES, "generate.budget=1")
    with pytest.raises(ValueError, match="a budget needs one process on a local run folder"):
        generate.main(cfg, "memory://budget-run")
    cfg = config("http://127.0.0.1:9/v1", "generate.transport=batch")
    with pytest.raises(ValueError, match="transport=batch needs one process"):
        generate.main(cfg, "memory://batch-run")


def test_a_local_engine_is_estimated_by_the_engine_time_of_its_pilot(tmp_path, tiny_llama):
    over = ["task.n_train=8", "generate.backend=hf", "generate.dtype=float32",
            f"generate.model={tiny_llama}",
            "generate.max_new_tokens=16", "generate.price_hour=3600"]  # 1 per engine-second
    cfg = load_config("configs/demo.yaml", over)
    e = estimate(cfg, generate.RunFolder(str(tmp_path)))
    assert math.isnan(e["cost"])  # not known without a pilot, and said so
    assert "only a pilot measures" in " ".join(lines(e, cfg))
    cfg = load_config("configs/demo.yaml", over + ["generate.pilot_questions=2"])
    e = estimate(cfg, generate.RunFolder(str(tmp_path)))
    assert e["pilot"]["questions"] == 2 and e["pilot"]["traces"] == 4
    assert e["cost"] == pytest.approx(e["pilot"]["cost"] * 4) and e["cost"] > 0
    assert "from the pilot's engine time" in " ".join(lines(e, cfg))
