"""End to end on the real embedded model as the teacher, kept small (marked slow; CI runs them).

The teacher is the real model where a test needs right answers (the filter keeps only those) or
its real top-k; students train from the tiny random model of the same architecture and tokenizer
(`tiny_llama`): these tests check the stages' protocol, not what a student learns. Everything
runs in float32: bfloat16 matrix products are ~25x slower on CPUs without AVX-512 BF16."""

import numpy as np
import pytest

from pipeline.schema import logical
from pipeline.config import load_config
from pipeline.run_folder import RunFolder
from stages.commands.cli import STAGES, run_stages

pytestmark = pytest.mark.slow

# the hf backend (the vllm backend's own end-to-end tests are in test_vllm.py)
SMALL = ["generate.backend=hf", "task.n_train=12", "task.n_test=8", "generate.rows_per_shard=4",
         "generate.n_samples=1", "generate.max_new_tokens=32", "generate.batch_size=8", "train.max_steps=2",
         "train.batch_size=4", "train.save_steps=1", "eval.n=8", "eval.max_new_tokens=24",
         "eval.batch_size=8", "generate.dtype=float32", "train.dtype=float32", "eval.dtype=float32"]


def _traces(run_dir):
    folder = RunFolder(run_dir).stage("generate")
    m = folder.manifest()
    return m, folder.read_tables(m["files"], each=logical)


def _manifest(run_dir, stage):
    return RunFolder(run_dir).stage(stage).manifest()


class Recording:
    """A real teacher handed to the generate stage, with every prompt it is asked recorded;
    it stops the run (as Ctrl-C would) at its `stop_at`-th call."""

    def __init__(self, inner, stop_at=None):
        self.inner, self.stop_at, self.calls, self.prompts = inner, stop_at, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, settings):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt("simulated stop")
        self.prompts.extend(prompts)
        return self.inner.generate(prompts, settings)


def test_all_stages_then_caching_and_partial_reruns(tmp_path, embedded_path, tiny_llama,
                                                    capsys):
    import stages.filter.stage as filter_stage
    import stages.generate.stage as generate
    from stages.backends.hf import HFBackend

    cfg = load_config("configs/demo.yaml", SMALL + [f"train.student={tiny_llama}"])
    run_dir = tmp_path / "run"
    run_stages(STAGES, cfg, run_dir)

    # generate: shards with top-k rows for every generated token, self-describing facts
    manifest, traces = _traces(run_dir)
    facts = manifest["facts"]
    assert facts["k"] == 20 and facts["vocab_size"] == 49152
    assert facts["logprob_source"] == "raw_logits" and len(facts["tokenizer_fingerprint"]) == 16
    assert traces.num_rows == 12 and len(manifest["files"]) == 3
    for row in traces.to_pylist():
        n = len(row["token_ids"])
        assert n > 0 and len(row["topk_ids"]) == n == len(row["token_logprobs"])
        lp = np.array(row["topk_logprobs"])
        assert lp.shape == (n, 20) and (np.diff(lp, axis=1) <= 1e-6).all() and (lp <= 0).all()
        # the sampled token's log-probability is consistent with its rank in the top-k
        for t, tok in enumerate(row["token_ids"]):
            if tok in row["topk_ids"][t]:
                j = row["topk_ids"][t].index(tok)
                assert abs(row["token_logprobs"][t] - lp[t, j]) < 2 ** -6 + 1e-4  # format 2
            else:
                assert row["token_logprobs"][t] <= lp[t, -1] + 2 ** -6 + 1e-4
    # filter, train, eval outputs
    assert (run_dir / "filter" / "funnel.json").is_file()
    assert (run_dir / "filter" / "funnel.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "train" / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "train" / "log.jsonl").is_file()
    report = _manifest(run_dir, "eval")
    assert [r["system"] for r in report["results"]] == ["teacher", "base", "predict", "explain"]
    assert all(r["n"] == 8 for r in report["results"])
    assert (run_dir / "eval" / "teacher.parquet").is_file()

    # up to date: no teacher is built, and it says so
    def no_teacher():
        raise AssertionError("the teacher must not be loaded")

    capsys.readouterr()
    generate.main(cfg, run_dir, teacher=no_teacher)
    assert "up to date" in capsys.readouterr().err

    # a changed filter setting re-filters the cached shards, still without the teacher
    before = _manifest(run_dir, "filter")["fingerprint"]
    cfg2 = load_config("configs/demo.yaml", SMALL + [f"train.student={tiny_llama}",
                                                     "filter.min_steps=0"])
    after = filter_stage.main(cfg2, run_dir)
    assert after["fingerprint"] != before and after["shards_written"] == 3
    assert _manifest(run_dir, "generate")["fingerprint"] == manifest["fingerprint"]

    # deleting one generate shard regenerates that shard alone
    teacher = Recording(HFBackend(cfg.generate.model, cfg.generate.dtype))
    (run_dir / "generate" / "traces-00001.parquet").unlink()
    m2 = generate.main(cfg, run_dir, teacher=lambda: teacher)
    assert len(teacher.prompts) == 4 and m2["shards_written"] == 1 and m2["shards_reused"] == 2
    assert _traces(run_dir)[1].column("id").to_pylist() == traces.column("id").to_pylist()


def test_generate_resumes_after_a_crash_without_duplicates(tmp_path, tiny_llama):
    import stages.generate.stage as generate
    from stages.backends.hf import HFBackend

    cfg = load_config("configs/demo.yaml", SMALL + ["generate.batch_size=2",
                                                    f"generate.model={tiny_llama}"])
    run_dir = tmp_path / "run"
    hf = HFBackend(cfg.generate.model, cfg.generate.dtype)
    stopping = Recording(hf, stop_at=5)  # the third shard's first batch
    with pytest.raises(KeyboardInterrupt):
        generate.main(cfg, run_dir, teacher=lambda: stopping)
    done = sorted(p.name for p in (run_dir / "generate").glob("traces-*.parquet"))
    assert done == ["traces-00000.parquet", "traces-00001.parquet"]
    assert _manifest(run_dir, "generate") is None

    manifest = generate.main(cfg, run_dir, teacher=lambda: hf)
    assert manifest["shards_reused"] == 2 and manifest["shards_written"] == 1
    ids = _traces(run_dir)[1].column("id").to_pylist()
    assert sorted(ids) == [f"demo-train-{i:06d}" for i in range(12)]


def test_topk_capture_sees_the_raw_logits(embedded_path):
    """The captured top-k equals log_softmax of transformers' own raw `output_logits`."""
    import torch
    from transformers import LogitsProcessorList

    from stages.backends.hf import HFBackend, _TopKCapture

    be = HFBackend("smollm2-135m-instruct", dtype="float32")
    enc = be.tokenizer(["Question: 2 + 2 = ?\nAnswer:"], return_tensors="pt")
    cap = _TopKCapture(5)
    torch.manual_seed(0)
    out = be.model.generate(**enc, max_new_tokens=6, do_sample=True, temperature=0.5,
                            top_p=0.9, top_k=0, output_logits=True, return_dict_in_generate=True,
                            logits_processor=LogitsProcessorList([cap]),
                            pad_token_id=be.tokenizer.pad_token_id)
    for step, logits in enumerate(out.logits):
        ref = torch.log_softmax(logits.float(), -1).topk(5)
        assert torch.allclose(cap.topk_logprobs[step], ref.values, atol=1e-5)
        assert torch.equal(cap.topk_ids[step].long(), ref.indices)


def test_train_resumes_from_its_last_checkpoint(tmp_path, embedded_path, tiny_llama,
                                                 monkeypatch):
    import json

    import stages.train.stage as train
    from trainer.dss import JsonlLogCallback

    cfg = load_config("configs/demo.yaml", SMALL + [f"train.student={tiny_llama}",
                                                    "train.max_steps=4", "train.save_steps=2",
                                                    "train.batch_size=2",
                                                    "train.logging_steps=1"])
    run_dir = tmp_path / "run"
    run_stages(["generate", "filter"], cfg, run_dir)

    def stop_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:  # checkpoint-2 exists, step 3 is lost
            raise KeyboardInterrupt("simulated stop")

    monkeypatch.setattr(JsonlLogCallback, "on_step_end", stop_at_step_3, raising=False)
    with pytest.raises(KeyboardInterrupt):
        train.main(cfg, run_dir)
    assert (run_dir / "train" / "checkpoints" / "checkpoint-2").is_dir()
    assert _manifest(run_dir, "train") is None
    monkeypatch.undo()

    manifest = train.main(cfg, run_dir)
    assert manifest["counters"]["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "log.jsonl").open()]
    assert steps.count(1) == 1 and 4 in steps  # steps 1-2 were not trained twice
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()
    again = train.main(cfg, run_dir)
    assert again["fingerprint"] == manifest["fingerprint"]


def test_kd_targets_are_the_teachers_tokens_and_variants_side_by_side(tmp_path, embedded_path,
                                                                      tiny_llama):
    """On real generated and filtered shards: every explain target token is the teacher's own
    token with its top-k row, the rationale without its answer sentence; three students
    (answer-only, DSS, DSS + KD) train on the same traces into their own folders, and eval
    scores all three in one table."""
    import json

    from pipeline.models import load_tokenizer
    from stages.eval import stage as eval_stage
    from trainer.examples import build_examples
    from trainer.students.causal_lm import CausalLMStudent

    base = SMALL + ["task.n_train=24", "generate.n_samples=2", "filter.min_steps=0",
                    f"train.student={tiny_llama}"]
    cfg = load_config("configs/demo.yaml", base + ["train.kd_lam=0.5", "train.name=kd"])
    run_dir = tmp_path / "run"
    run_stages(["generate", "filter"], cfg, run_dir)
    folder = RunFolder(run_dir).stage("filter")
    kept = folder.read_tables([s["outputs"]["kept"] for s in folder.manifest()["shards"]],
                              each=logical).to_pylist()
    assert kept, "the teacher should get a few of these right"
    tok = load_tokenizer(embedded_path, padding_side="right")
    student = CausalLMStudent()
    plain = build_examples(kept, tok, student, 160, teacher_tokens=True)
    kd = build_examples(kept, tok, student, 160, teacher_tokens=True, with_topk=True)
    for row, ex, ex0 in zip(kept, kd, plain):
        ex, ex0 = ex["explain"], ex0["explain"]
        labels = [x for x in ex["labels"] if x != -100]
        target = labels[:-1]
        assert labels[-1] == tok.eos_token_id and len(ex["topk_ids"]) == len(labels)
        assert target == row["token_ids"][:len(target)]
        assert tok.decode(target, skip_special_tokens=True).strip() == row["rationale"]
        assert ex["topk_ids"][:len(target)] == row["topk_ids"][:len(target)]
        assert ex["topk_ids"][-1] == [-1] * 20
        # DSS without KD trains on the very same tokens, just without the top-k rows
        assert ex0["labels"] == ex["labels"] and "topk_ids" not in ex0
    # the re-tokenised text differs (the teacher's first token carries the leading space)
    assert any(a["explain"]["labels"] != b["explain"]["labels"]
               for a, b in zip(plain, build_examples(kept, tok, student, 160)))

    run_stages(["train"], cfg, run_dir)
    log = [json.loads(x) for x in (run_dir / "train-kd" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss_kd" in r]
    assert steps and all(np.isfinite(r["loss_kd"]) and r["loss_kd"] > 0 for r in steps)
    facts = _manifest(run_dir, "train-kd")["facts"]
    assert facts["kd_lam_used"] == 0.5 and facts["explain_targets"] == "tokens"
    assert not (run_dir / "train").exists()

    run_stages(["train"], load_config("configs/demo.yaml", base), run_dir)
    sft = load_config("configs/demo.yaml", base + ["train.alpha=1.0", "train.name=sft"])
    run_stages(["train"], sft, run_dir)
    log = [json.loads(x) for x in (run_dir / "train-sft" / "log.jsonl").read_text().splitlines()]
    assert any("loss_predict" in r for r in log)
    assert not any("loss_explain" in r for r in log), "alpha=1 must skip the explain pass"
    assert _manifest(run_dir, "train")["facts"]["explain_targets"] == "tokens"

    ev = load_config("configs/demo.yaml", base + ["eval.systems=[predict,explain]"])
    report = eval_stage.main(ev, run_dir)
    got = [(r["system"], r.get("variant", "")) for r in report["results"]]
    assert got == [("predict", ""), ("explain", ""), ("predict", "kd"), ("explain", "kd"),
                   ("predict", "sft"), ("explain", "sft")]
    assert (run_dir / "eval" / "explain-kd.parquet").is_file()
    only = load_config("configs/demo.yaml", base + ["eval.systems=[predict]",
                                                    "eval.variants=[kd]"])
    assert [r.get("variant") for r in eval_stage.main(only, run_dir)["results"]] == ["kd"]
    with pytest.raises(FileNotFoundError, match="'nope'"):
        eval_stage.main(load_config("configs/demo.yaml", base + ["eval.variants=[nope]"]),
                        run_dir)
