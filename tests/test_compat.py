"""Run folders written before the current layout are read as they are: nothing is redone."""

import json
import shutil
from pathlib import Path

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
from pipeline.config import load_config
from pipeline.run_folder import RunFolder

# Written by commit 2281697 (the layout before stages became plans of shard functions): the
# generate stage with a scripted teacher (8 demo rows x 2 samples, k = 3), then the filter.
FIXTURE = Path(__file__).parent / "fixtures" / "run-before-house"
OVERRIDES = ["task.n_train=8", "generate.rows_per_shard=4", "generate.n_samples=2",
             "generate.top_k=3", "generate.backend=hf", "filter.min_steps=0"]


def test_a_run_folder_written_before_is_up_to_date(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    before = {s: json.loads((FIXTURE / s / "manifest.json").read_text())
              for s in ("generate", "filter")}
    cfg = load_config("configs/demo.yaml", OVERRIDES)

    def no_teacher():
        raise AssertionError("nothing may be generated again")

    generated = generate.main(cfg, run, teacher=no_teacher)
    filtered = filter_stage.main(cfg, run)
    assert capsys.readouterr().err.count("up to date") == 2
    for stage, manifest in (("generate", generated), ("filter", filtered)):
        assert manifest["fingerprint"] == before[stage]["fingerprint"]
        assert manifest["files"] == before[stage]["files"]
    kept = run.stage("filter").read_tables([s["outputs"]["kept"]
                                            for s in filtered["shards"]])
    assert kept.num_rows == 8 and set(kept.column("sample").to_pylist()) == {0}


def test_a_student_trained_before_keeps_its_fingerprint():
    """The train fingerprint is what the code before the current layout computed on the same
    filter output (recorded from commit 2281697), so its trained students are up to date."""
    from pipeline.fingerprints import fingerprint
    from stages.train.stage import train_fingerprinted
    from trainer.students.causal_lm import CausalLMStudent

    upstream = RunFolder(FIXTURE).stage("filter").manifest()
    for extra, recorded in (([], "0cf3676e72053af2"), (["train.kd_lam=0.5"], "a792cafa399bb6e2")):
        cfg = load_config("configs/demo.yaml", OVERRIDES + extra)
        assert fingerprint(train_fingerprinted(cfg, upstream, CausalLMStudent())) == recorded


def test_filter_as_a_job_array_equals_the_local_filter(tmp_path):
    """The filter stage takes the same job-array flags as generate: two workers and a finalize
    on the recorded traces write the files a local run writes, and the funnel."""
    from pipeline.executors.array import ArrayRole

    cfg = load_config("configs/demo.yaml", OVERRIDES[:-1] + ["filter.min_steps=1"])
    for name in ("local", "array"):
        shutil.copytree(FIXTURE, tmp_path / name)
    local = filter_stage.main(cfg, RunFolder(tmp_path / "local"))
    run = RunFolder(tmp_path / "array")
    # the recorded filter ran with other settings: an array starts over with a new plan
    assert filter_stage.main(cfg, run, force=True, role=ArrayRole(plan_only=True)) is None
    for i in range(2):
        assert filter_stage.main(cfg, run, role=ArrayRole(2, i)) is None
    assert run.stage("filter").manifest() is None
    done = filter_stage.main(cfg, run, role=ArrayRole(finalize=True))
    assert [f["sha256"] for f in done["files"]] == [f["sha256"] for f in local["files"]]
    assert done["counters"] == local["counters"]
    assert run.stage("filter").read_json("funnel.json")["counters"] == local["counters"]
