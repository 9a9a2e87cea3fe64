"""The openai backend against a real local HTTP server that injects failures."""

import numpy as np
import pytest

from fake_openai import FakeServer
from pipeline.schema import logical
from pipeline.config import load_config
from pipeline.tasks import load_split
from stages.backends.base import SamplingSettings
from stages.backends.openai_api import OpenAIBackend, TokenMapper, parse_chat_choice

SETTINGS = SamplingSettings(n=2, temperature=0.7, top_p=1.0, max_new_tokens=8, top_k=4,
                            seed=0, stop=[])


def backend(tmp_path, url, **over):
    extra = [f"generate.{k}={v}" for k, v in over.items()]
    cfg = load_config(None, ["generate.backend=openai", f"generate.base_url={url}",
                             "generate.server_token_ids=true", "generate.request_timeout=10",
                             "generate.backoff_max=0.05", "generate.max_retries=3",
                             "generate.model=fake"] + extra)
    return OpenAIBackend(cfg.generate, tmp_path / "requests.sqlite")


def test_an_answer_that_is_not_json_is_retried_then_named(tmp_path):
    """A gateway's HTML page with status 200: retried like a 5xx; when it keeps coming, the
    row's error names the endpoint and what came back, not a Python traceback."""
    scripts = {"once": ["html", "ok"], "always": ["html"] * 10}
    with FakeServer(scripts) as server:
        out = dict(zip(scripts, backend(tmp_path, server.base_url).generate(list(scripts),
                                                                             SETTINGS)))
    assert isinstance(out["once"], list) and out["once"][0].text == "answer 0 to once"
    error = str(out["always"])
    assert not isinstance(out["always"], list) and server.attempts["always"] == 4
    assert "/completions answered 200 with a body that is not JSON" in error
    assert "<html><body>Gateway" in error and "AttributeError" not in error


def _settled(server, limit: float = 60.0) -> None:
    """Waits until the server has answered every request it accepted (a request the client
    gave up on may still be read after the client's call returned)."""
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with server.lock:
            before = sum(server.attempts.values())
        time.sleep(0.5)
        with server.lock:
            if sum(server.attempts.values()) == before:
                return


def test_failures_are_retried_or_recorded_and_nothing_is_generated_twice(tmp_path):
    scripts = {"rate": ["429", "ok"], "flaky": ["500", "500", "ok"], "slow": ["stall", "ok"],
               "garbled": ["malformed", "ok"], "cut": ["truncated", "ok"], "bad": ["400"],
               "down": ["500"] * 10}
    prompts = list(scripts) + ["fine"]
    # a timeout far above an answer's time on a loaded machine, the stall far above the timeout
    with FakeServer(scripts, stall_seconds=12.0) as server:
        be = backend(tmp_path, server.base_url, request_timeout=6.0)
        out = be.generate(prompts, SETTINGS)
        by_prompt = dict(zip(prompts, out))
        _settled(server)
        for p in ["rate", "flaky", "slow", "garbled", "cut", "fine"]:
            gens = by_prompt[p]
            assert isinstance(gens, list) and len(gens) == 2, (p, gens)
            assert gens[0].text == f"answer 0 to {p}"
        assert "BadRequestError" in str(by_prompt["bad"]) and server.attempts["bad"] == 1
        assert "InternalServerError" in str(by_prompt["down"]) and server.attempts["down"] == 4
        assert max(server.successes.values()) == 1
        # the 429 said Retry-After: 0.2, longer than any backoff of this config (0.05 s)
        first, second = server.times["rate"][:2]
        assert second - first >= 0.2
        # a rerun (after a crash, say) is served from the cache for every finished request
        again = backend(tmp_path, server.base_url)
        before = dict(server.successes)
        out2 = again.generate(prompts, SETTINGS)
        assert all(server.successes[p] == n for p, n in before.items())
        assert again.stats["cache_hits"] == 6
        assert server.successes["bad"] == 1  # a request that never succeeded is sent again
        for first, second in zip(out, out2):
            if isinstance(first, list):
                assert [g.text for g in second] == [g.text for g in first]


def test_top_logprobs_are_sorted_and_ids_parsed():
    from fake_openai import completion

    choice = completion("q", 1, 4, 3)["choices"][0]
    gen, check = parse_chat_choice(choice, 4, TokenMapper())
    assert check == {"tokens": 3, "sampled_unmapped": 0, "topk_unmapped": 0, "text_mismatch": 0}
    assert gen.token_ids.tolist() == [10, 11, 12]
    # the server put the sampled token last; sorted by log-probability it comes first
    assert gen.topk_ids[0].tolist() == [10, 50, 51, 52]
    assert (np.diff(gen.topk_logprobs, axis=1) <= 0).all()


def test_strings_without_a_tokenizer_are_not_usable_for_kd():
    choice = {"index": 0, "finish_reason": "length", "message": {"content": "hi"},
              "logprobs": {"content": [{"token": "hi", "logprob": -0.1,
                                        "top_logprobs": [{"token": "hi", "logprob": -0.1}]}]}}
    gen, check = parse_chat_choice(choice, 1, TokenMapper())
    assert check["sampled_unmapped"] == 1 and check["topk_unmapped"] == 1
    assert gen.finish_reason == "length" and gen.token_ids.tolist() == [-1]


def test_key_and_k_limits(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    cfg = load_config(None, ["generate.backend=openai", "generate.api_key_env=NO_SUCH_KEY"])
    with pytest.raises(ValueError, match="NO_SUCH_KEY is not set"):
        OpenAIBackend(cfg.generate, tmp_path / "c.sqlite")
    with pytest.raises(Exception, match="<= 20"):
        load_config(None, ["generate.backend=openai", "generate.top_k=50"])


@pytest.mark.parametrize("secret", ["sk-proj-4fT9xQ2mL8vR1cZ7", "a1b2c3d4e5f6a7b8c9d0e1f2"])
def test_a_key_given_where_its_variables_name_belongs_is_refused_unshown_and_unwritten(
        tmp_path, capsys, secret):
    from stages.commands.cli import main as cli

    for name in ["OPENAI_API_KEY", "MY_TEAM_KEY_2", "together"]:
        load_config(None, ["generate.backend=openai", f"generate.api_key_env={name}"])
    code = cli(["generate", "--config", "configs/demo.yaml", "--run", "r", "--runs-dir",
                str(tmp_path), "generate.backend=openai", f"generate.api_key_env={secret}"])
    said = capsys.readouterr()
    assert code != 0 and "generate.api_key_env: give the name of the environment" in said.err
    assert secret not in said.err + said.out
    assert not any(secret in f.read_text(errors="ignore")
                   for f in tmp_path.rglob("*") if f.is_file())


def test_sigkilled_generate_run_resumes_without_resending_finished_requests(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.run_folder import RunFolder

    args = [sys.executable, "-m", "stages.commands.cli", "generate", "--config", "configs/demo.yaml",
            "--run", "r", "--runs-dir", str(tmp_path), "task.n_train=48",
            "generate.rows_per_shard=8", "generate.batch_size=8", "generate.n_samples=1",
            "generate.backend=openai", "generate.server_token_ids=true",
            "generate.concurrency=2", "generate.model=fake"]
    with FakeServer(delay=0.1) as server:
        args.append(f"generate.base_url={server.base_url}")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600  # an outer limit: the wait is on the server's count
        while sum(server.successes.values()) < 20 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # requests in flight at the kill are still answered (into a dead pipe)
        served = sum(server.successes.values())
        assert 20 <= served < 48
        assert RunFolder(tmp_path / "r").stage("generate").manifest() is None
        import sqlite3

        db = sqlite3.connect(tmp_path / "r" / "generate" / "requests.sqlite")
        finished = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        db.close()
        # at most the requests in flight at the kill were answered but never stored
        assert served - 2 <= finished <= served

        rerun = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    folder = RunFolder(tmp_path / "r").stage("generate")
    manifest = folder.manifest()
    table = folder.read_tables(manifest["files"], each=logical)
    assert sorted(table.column("id").to_pylist()) == [f"demo-train-{i:06d}" for i in range(48)]
    # the rerun sent exactly the requests that had not finished: none was paid for twice
    assert sum(server.successes.values()) - served == 48 - finished
    assert manifest["facts"]["usable_for_kd"] is True


def test_token_strings_map_to_ids_with_the_teachers_tokenizer(embedded_path):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(embedded_path)
    mapper = TokenMapper(tok)
    text = "Anna has 5 + 3 = 8 apples."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    content = [{"token": tok.decode([i]), "logprob": -0.1,
                "top_logprobs": [{"token": tok.decode([i]), "logprob": -0.1}]} for i in ids]
    choice = {"index": 0, "finish_reason": "stop", "message": {"content": text},
              "logprobs": {"content": content}}
    gen, check = parse_chat_choice(choice, 1, mapper)
    assert check["text_mismatch"] == 0 and gen.token_ids.tolist() == ids
    # a text that does not round-trip (the server's tokens disagree with it) is not usable
    choice["message"]["content"] = text + "!"
    assert parse_chat_choice(choice, 1, mapper)[1]["text_mismatch"] == 1


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_the_token_that_hit_the_stop_string_is_not_kept(tmp_path, endpoint):
    """vLLM's server returns the log-probabilities of the token that completed the stop string
    (or of the end-of-sequence token) though the text stops before it; the shard keeps the
    tokens of the text only, on both endpoints."""
    with FakeServer(stop_token=True) as server:
        be = backend(tmp_path, server.base_url, endpoint=endpoint)
        gens = be.generate(["q1", "a longer question"], SETTINGS)
    for prompt, row in zip(["q1", "a longer question"], gens):
        for i, gen in enumerate(row):
            assert gen.text == f"answer {i} to {prompt}"
            assert gen.token_ids.tolist() == [10, 11, 12, 13, 14]
            assert gen.topk_ids.shape == (5, 4) and gen.token_logprobs.shape == (5,)
    assert be.usable_for_kd and be.facts()["endpoint"] == endpoint


def test_completions_top_logprobs_with_colliding_strings_leave_empty_slots():
    from stages.backends.openai_api import parse_completion_choice

    mapper = TokenMapper()
    mapper.by_text = {"a": 1, "b": 2, "c": 3}
    choice = {"index": 0, "finish_reason": "length", "text": "ab", "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2], "text_offset": [0, 1],
        "top_logprobs": [{"a": -0.1, "c": -2.0}, {"b": -0.2}]}}  # the 2nd lost one to a clash
    gen, check = parse_completion_choice(choice, 2, mapper)
    assert gen.token_ids.tolist() == [1, 2] and gen.topk_ids.tolist() == [[1, 3], [2, -1]]
    assert check["topk_unmapped"] == 1 and check["sampled_unmapped"] == 0
    assert np.isneginf(gen.topk_logprobs[1, 1])


def test_completions_with_a_chat_template_is_refused():
    with pytest.raises(Exception, match="endpoint=chat"):
        load_config(None, ["generate.backend=openai", "generate.endpoint=completions",
                           "generate.chat_template=true"])


def test_a_run_whose_token_strings_have_no_ids_says_it_is_not_usable_for_kd(tmp_path):
    from pipeline.run_folder import RunFolder
    from stages.generate import stage as generate

    with FakeServer(strings=True) as server:
        cfg = load_config("configs/demo.yaml", [
            "task.n_train=6", "generate.rows_per_shard=3", "generate.n_samples=1",
            "generate.backend=openai", f"generate.base_url={server.base_url}",
            "generate.model=fake", "generate.max_new_tokens=5"])
        generate.main(cfg, tmp_path)
    facts = RunFolder(tmp_path).stage("generate").manifest()["facts"]
    assert facts["usable_for_kd"] is False
    assert "generate.tokenizer" in facts["kd_unusable_because"]
    assert facts["kd_check"]["sampled_unmapped"] == facts["kd_check"]["tokens"] == 30


def test_eval_scores_an_api_teacher_through_its_api_and_records_failed_requests(tmp_path):
    from pipeline.prompts import PromptTemplate
    from stages.eval import stage as eval_stage

    with FakeServer(stop_token=True) as server:  # ids and the stop token, as vLLM sends them
        cfg = load_config("configs/demo.yaml", [
            "task.n_test=5", "eval.n=5", "eval.systems=[teacher]", "generate.backend=openai",
            f"generate.base_url={server.base_url}", "generate.model=fake",
            "generate.endpoint=completions", "generate.max_retries=0"])
        server.scripts = {PromptTemplate(cfg.generate.prompt_template).render(
            load_split(cfg.task, "test").column("question")[1].as_py()): ["400"]}
        report = eval_stage.main(cfg, tmp_path)
        assert sum(server.successes.values()) == 4
    (teacher,) = report["results"]
    assert teacher["system"] == "teacher" and teacher["n"] == 5
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "eval" / "teacher.parquet").to_pylist()
    assert rows[1]["finish_reason"].startswith("error: ") and not rows[1]["correct"]
    assert rows[0]["output"].startswith("answer 0 to ") and rows[0]["n_tokens"] == 5
