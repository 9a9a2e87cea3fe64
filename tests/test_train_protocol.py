"""Train commits through the same protocol as the shard stages: the lock is taken before the
student is loaded, a finished adapter is recorded before the manifest (a kill in between, or a
lost manifest, costs no training), and a training that ended at its last checkpoint is never
trained a step further. The filter writes its reports before its manifest."""

from __future__ import annotations

import errno

import pytest

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
import stages.train.stage as train
from fake_openai import FakeServer
from pipeline.config import load_config
from pipeline.lock import StageLock, StageLocked
from pipeline.run_folder import RunFolder


def config(url: str, *more: str):
    return load_config("configs/demo.yaml", [
        "task.n_train=16", "generate.rows_per_shard=8", "generate.n_samples=1",
        "generate.backend=openai", "generate.server_token_ids=true", "generate.model=fake",
        f"generate.base_url={url}", "generate.request_timeout=30", "generate.backoff_max=0.05",
        "generate.max_retries=1", "generate.concurrency=4", "generate.top_k=4",
        "filter.require_answer_marker=false", "filter.min_steps=0", "filter.min_tokens=1",
        "filter.min_words=1", "train.dtype=float32", "train.max_steps=2", "train.batch_size=2",
        "train.save_steps=50", "train.logging_steps=1", *more])


@pytest.fixture
def filtered(tmp_path, tiny_llama):
    """A filtered run whose student is the tiny random model (the protocol, not the learning)."""
    with FakeServer() as server:
        cfg = config(server.base_url, f"train.student={tiny_llama}")
        generate.main(cfg, tmp_path)
        filter_stage.main(cfg, tmp_path)
    return cfg, tmp_path


def _no_student(*args, **kwargs):
    raise AssertionError("the student must not be loaded")


def test_a_second_train_is_refused_before_it_loads_the_student(filtered, monkeypatch):
    cfg, run = filtered
    monkeypatch.setattr("trainer.lora.lora_student", _no_student)
    with StageLock(RunFolder(run).stage("train")):
        with pytest.raises(StageLocked):
            train.main(cfg, run)


def test_the_filter_writes_its_reports_before_its_manifest(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filter_stage, "write_dataset_card", full_disk)
    with FakeServer() as server:
        cfg = config(server.base_url)
        generate.main(cfg, tmp_path)
        with pytest.raises(OSError):
            filter_stage.main(cfg, tmp_path)
    assert RunFolder(tmp_path).stage("filter").manifest() is None
    monkeypatch.undo()
    manifest = filter_stage.main(cfg, tmp_path)  # the shards are reused, the reports written
    assert manifest["shards_reused"] == 2 and (tmp_path / "filter" / "README.md").is_file()


@pytest.mark.slow
def test_a_lost_manifest_or_record_costs_no_training_and_no_extra_step(filtered, monkeypatch,
                                                                      capsys):
    cfg, run = filtered
    first = train.main(cfg, run)
    assert first["counters"]["steps"] == 2
    adapter = run / "train" / "adapter" / "adapter_model.safetensors"
    weights = adapter.read_bytes()

    # killed after the adapter and its record were written, before the manifest
    (run / "train" / "manifest.json").unlink()
    monkeypatch.setattr("trainer.lora.lora_student", _no_student)
    again = train.main(cfg, run)
    assert again["shards_reused"] == 1 and again["counters"] == first["counters"]
    assert again["fingerprint"] == first["fingerprint"] and adapter.read_bytes() == weights
    monkeypatch.undo()

    # killed after the last checkpoint, before the adapter's record: the checkpoint is the end
    (run / "train" / "manifest.json").unlink()
    for record in (run / "train" / "done").iterdir():
        record.unlink()
    capsys.readouterr()
    last = train.main(cfg, run)
    assert "is the last step of this training" in capsys.readouterr().err
    assert last["counters"]["steps"] == 2  # not one step past train.max_steps
    assert last["counters"]["train_loss"] == first["counters"]["train_loss"]
    assert adapter.read_bytes() == weights
