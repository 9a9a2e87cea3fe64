"""`distill convert-shards` on a run written before format 2 (the float32 top-k of format 1):
verified, nothing lost, both stages stay up to date, a stopped conversion finishes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
from pipeline.config import load_config
from pipeline.run_folder import RunFolder, StageFolder
from pipeline.schema import shard_format
from stages.commands.cli import main as cli
from stages.commands.convert import ConversionError, convert_run, verify
from stages.train.stage import kept_rows

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-house"   # format 1, k = 3
OVERRIDES = ["task.n_train=8", "generate.rows_per_shard=4", "generate.n_samples=2",
             "generate.top_k=3", "generate.backend=hf", "filter.min_steps=0"]


def no_teacher():
    raise AssertionError("nothing may be generated again")


def formats(run: RunFolder, stage: str) -> set[int]:
    folder = run.stage(stage)
    return {shard_format(folder.read_checked(e).schema) for e in folder.manifest()["files"]}


def rows(run: RunFolder) -> list[dict]:
    return kept_rows(run.stage("filter"), run.stage("filter").manifest(), True, True)


def test_a_format_1_run_converts_and_stays_up_to_date(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    before = rows(run)
    assert formats(run, "generate") == {1} and formats(run, "filter") == {1}
    assert cli(["convert-shards", "--runs-dir", str(tmp_path), "--run", "run"]) == 0
    err = capsys.readouterr().err
    assert "[generate] 2 shard file(s) in format 2" in err and "[filter] shard files:" in err
    assert formats(run, "generate") == {2} and formats(run, "filter") == {2}
    # the old files are kept aside, byte for byte
    for stage in ("generate", "filter"):
        old = {p.name: p.read_bytes() for p in (FIXTURE / stage).glob("*.parquet")}
        kept = {p.name: p.read_bytes() for p in (tmp_path / "run" / stage).glob(
            "by-fingerprint/*-format1-*/*.parquet")}
        assert kept == old
        assert not (tmp_path / "run" / stage / "converting.json").exists()
    # the traces the trainer reads are the same, log-probabilities within half a step
    after = rows(run)
    assert len(after) == len(before) == 8
    for a, b in zip(before, after):
        assert a["topk_ids"] == b["topk_ids"] and a["token_ids"] == b["token_ids"]
        assert np.abs(np.array(a["topk_logprobs"]) - np.array(b["topk_logprobs"])).max() <= 2 ** -6
    # both stages are up to date: no teacher, nothing redone
    cfg = load_config("configs/demo.yaml", OVERRIDES)
    generated = generate.main(cfg, run, teacher=no_teacher)
    filtered = filter_stage.main(cfg, run)
    assert capsys.readouterr().err.count("up to date") == 2
    assert generated["shards_written"] == 2 and filtered["files"] == json.loads(
        (tmp_path / "run" / "filter" / "manifest.json").read_text())["files"]
    # again: nothing to do; and back to format 1
    assert cli(["convert-shards", "--runs-dir", str(tmp_path), "--run", "run"]) == 0
    assert capsys.readouterr().err.count("already in format 2") == 2
    assert cli(["convert-shards", "--runs-dir", str(tmp_path), "--run", "run", "--to", "1"]) == 0
    assert formats(run, "generate") == {1}
    again = rows(run)
    assert [{k: r[k] for k in before[0]} for r in again] == [
        {k: r[k] for k in before[0]} for r in after]
    generate.main(cfg, run, teacher=no_teacher)
    assert "up to date" in capsys.readouterr().err


def test_a_stopped_conversion_is_finished_by_running_it_again(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    real_move, calls = StageFolder.move, []

    def dies_on_second_swap(self, src, dest):
        if src.endswith(".convert.tmp"):
            calls.append(src)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real_move(self, src, dest)

    monkeypatch.setattr(StageFolder, "move", dies_on_second_swap)
    with pytest.raises(OSError):
        convert_run(run)
    monkeypatch.setattr(StageFolder, "move", real_move)
    # stopped half-way: one file swapped, the other journaled but still format 1
    journal = json.loads((tmp_path / "run" / "generate" / "converting.json").read_text())
    assert list(journal["swapped"]) == ["traces-00000.parquet", "traces-00001.parquet"]
    assert (RunFolder(tmp_path / "run").stage("generate").read_table("traces-00001.parquet")
            .schema.field("topk_logprobs"))
    convert_run(run)
    assert formats(run, "generate") == {2} and formats(run, "filter") == {2}
    cfg = load_config("configs/demo.yaml", OVERRIDES)
    assert generate.main(cfg, run, teacher=no_teacher)["fingerprint"]
    assert filter_stage.main(cfg, run)["shards_written"] == 2


def test_a_conversion_that_changes_content_is_refused():
    folder = RunFolder(FIXTURE).stage("generate")
    table = folder.read_checked(folder.manifest()["files"][0])
    other = table.set_column(table.schema.get_field_index("completion"), "completion",
                             table.column("completion").take([1, 0, 2, 3, 4, 5, 6, 7]))
    with pytest.raises(ConversionError, match="column completion differs"):
        verify(table, other, "x.parquet")


def test_an_unfinished_generate_stage_is_not_converted(tmp_path):
    with pytest.raises(FileNotFoundError, match="not finished"):
        convert_run(RunFolder(tmp_path))


@pytest.mark.slow
def test_a_student_trains_with_kd_on_format_1_shards_and_alike_after_conversion(tmp_path):
    """A real (hf) teacher's run written in format 1, trained with KD; then its shards
    converted and the same student trained again: the KD loss moves by the grid's error only."""
    import stages.train.stage as train_stage
    from stages.commands.cli import run_stages

    cfg = load_config("configs/demo.yaml", [
        "generate.backend=hf", "generate.dtype=float32", "task.n_train=8",
        "generate.rows_per_shard=4", "generate.n_samples=1", "generate.max_new_tokens=32",
        "filter.min_steps=0",
        "generate.shard_format=1", "train.kd_lam=0.5", "train.max_steps=2",
        "train.batch_size=4", "train.dtype=float32", "train.logging_steps=1"])
    run = RunFolder(tmp_path / "run")
    run_stages(["generate", "filter"], cfg, run)
    assert formats(run, "generate") == {1}
    logs = []
    for step in ("format 1", "format 2"):
        if step == "format 2":
            convert_run(run)
            assert formats(run, "filter") == {2}
        manifest = train_stage.main(cfg, run)
        assert manifest["counters"]["steps"] == 2, step
        logs.append([r["loss_kd"] for r in run.student().read_jsonl("log.jsonl")
                     if "loss_kd" in r])
    assert len(logs[0]) == 2 and all(v > 0 for v in logs[0])
    assert logs[1] == pytest.approx(logs[0], abs=2e-3)
