"""Run folders on object storage: every stage through a real S3 API (moto's server on
127.0.0.1, started and stopped here) with s3fs, as a user's `--runs-dir s3://bucket/prefix`."""

import sqlite3
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.executors import run_stage
from pipeline.executors.array import ArrayRole, ArrayWorker
from pipeline.run_folder import RunFolder
from pipeline.stage import Shard, ShardOutput, Stage



@pytest.fixture
def s3(monkeypatch):
    """An S3 API on 127.0.0.1 with one bucket; yields the runs URL. The environment carries
    the endpoint and (fake) credentials, as a user's would, to child processes too."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}",
                           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        import uuid

        import s3fs
        bucket = f"stepdistill-{uuid.uuid4().hex[:8]}"  # moto keeps buckets between servers
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield f"s3://{bucket}/runs"
    finally:
        server.stop()


def doubler(params, shard, resources, progress):
    table = shard.load()
    progress(table.num_rows)
    return ShardOutput({"out": pa.table({"x": [2 * v for v in table.column("x").to_pylist()]})},
                       {"rows": table.num_rows})


def toy(n=5):
    shards = [Shard(f"{i:05d}", f"sum{i}", 2, lambda i=i: pa.table({"x": [i, i + 1]}))
              for i in range(n)]
    return Stage(name="toy", fingerprinted={"k": 1}, shards=shards, work=doubler, settings=None,
                 outputs=["out"])


def test_stage_and_job_array_on_s3(s3, tmp_path):
    local = run_stage(toy(), RunFolder(tmp_path / "run").stage("toy"))
    folder = RunFolder(f"{s3}/array").stage("toy")
    assert folder.create_json("claim.json", {"by": 1}) is True  # create-if-absent on S3
    assert folder.create_json("claim.json", {"by": 2}) is False
    assert folder.read_json("claim.json") == {"by": 1}
    for i in range(2):
        assert ArrayWorker(ArrayRole(2, i)).run(toy(), folder) is None
    manifest = ArrayWorker(ArrayRole(finalize=True)).run(toy(), folder)
    assert [f["sha256"] for f in manifest["files"]] == [f["sha256"] for f in local["files"]]
    assert not [f for f in folder.files() if f.endswith(".tmp")]
    # read back by a fresh client: the stage is up to date
    again = run_stage(toy(), RunFolder(f"{s3}/array").stage("toy"))
    assert again["files"] == manifest["files"] and "finished_at" in again  # read, not redone


@pytest.mark.slow
def test_api_teacher_array_on_s3_merges_worker_caches_and_pays_once(s3, tmp_path):
    from fake_openai import FakeServer

    args = [sys.executable, "-m", "stages.commands.cli", "generate", "--config",
            "configs/demo.yaml", "--run", "api", "--runs-dir", s3, "task.n_train=24",
            "generate.rows_per_shard=4", "generate.n_samples=1", "generate.backend=openai",
            "generate.server_token_ids=true", "generate.model=fake"]
    with FakeServer() as server:
        args.append(f"generate.base_url={server.base_url}")
        workers = [subprocess.Popen(args + ["--num-workers", "2", "--worker-index", str(i)],
                                    stderr=subprocess.PIPE, text=True) for i in range(2)]
        errs = [w.communicate(timeout=300)[1] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], errs
        folder = RunFolder(f"{s3}/api").stage("generate")
        assert len(folder.files_under("requests", ".sqlite")) == 2  # one per worker
        done = subprocess.run(args + ["--finalize"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "merged 2 worker request cache(s)" in done.stderr
        assert folder.files_under("requests") == []
        merged = tmp_path / "merged.sqlite"
        folder.local.download("requests.sqlite", merged)
        assert sqlite3.connect(merged).execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 24
        paid = sum(server.successes.values())
        assert paid == 24
        # a lost shard is made again from the merged cache: no request is sent twice
        folder.remove("traces-00003.parquet")
        rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert sum(server.successes.values()) == paid
    manifest = folder.manifest()
    assert manifest["counters"]["traces"] == 24 and manifest["shards_reused"] == 5


@pytest.mark.slow
def test_all_stages_on_s3_then_up_to_date_and_train_resumes_from_the_store(s3, embedded_path,
                                                                            tiny_llama):
    """The real teacher (the filter keeps right answers only), the tiny random student."""
    import s3fs

    args = [sys.executable, "-m", "stages.commands.cli", "all", "--config", "configs/demo.yaml",
            "--run", "demo", "--runs-dir", s3, "generate.backend=hf", "generate.dtype=float32",
            "task.n_train=16", "task.n_test=4", "generate.rows_per_shard=8",
            "generate.max_new_tokens=40", "filter.min_steps=0", "train.dtype=float32",
            "train.max_steps=2", "train.batch_size=4", "train.save_steps=1", "eval.n=4",
            "eval.dtype=float32", "eval.max_new_tokens=16", f"train.student={tiny_llama}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = f"{s3[len('s3://'):]}/demo"
    for stage in ("generate", "filter", "train", "eval"):
        assert fs.exists(f"{root}/{stage}/manifest.json"), stage
    assert fs.exists(f"{root}/train/adapter/adapter_model.safetensors")
    assert fs.exists(f"{root}/train/checkpoints/checkpoint-2/trainer_state.json")
    assert fs.exists(f"{root}/eval/report.json")
    second = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("up to date") == 4, second.stderr[-3000:]

    # a training stopped after its first checkpoint, resumed on a machine that has nothing
    # local: the checkpoint comes back from the store
    import shutil
    folder = RunFolder(f"{s3}/demo").student()
    shutil.rmtree(folder.local.scratch("checkpoints"))
    for gone in ("manifest.json", "adapter", "checkpoints/checkpoint-2"):
        fs.rm(f"{root}/train/{gone}", recursive=True)
    train = args[:3] + ["train"] + args[4:]
    resumed = subprocess.run(train, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-1" in resumed.stderr
    assert fs.exists(f"{root}/train/checkpoints/checkpoint-2/trainer_state.json")
    assert folder.manifest()["counters"]["steps"] == 2


def test_one_writer_damaged_shards_and_kept_settings_on_s3(s3):
    """The lock, the check on read and the per-fingerprint output through the store."""
    from pipeline.lock import StageLock, StageLocked

    folder = RunFolder(f"{s3}/paid").stage("toy")
    with StageLock(folder):
        with pytest.raises(StageLocked, match="being written by another process"):
            StageLock(folder).acquire()
    assert not folder.exists("lock.json")
    first = run_stage(toy(), folder)
    other = toy()
    other.fingerprinted = {"k": 2}
    run_stage(other, folder)
    assert folder.exists(f"by-fingerprint/{first['fingerprint']}/out-00000.parquet")
    back = run_stage(toy(), folder)  # the first settings' output is brought back whole
    assert back == first  # its manifest, as it was: up to date, nothing redone
    # a damaged object is found, quarantined and its shard alone remade
    key = folder.path("out-00003.parquet")
    data = bytearray(folder.fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    folder.fs.pipe_file(key, bytes(data))
    again = run_stage(toy(), folder)
    assert again["shards_written"] == 1 and again["shards_reused"] == 4
    assert folder.files_under("quarantine", "out-00003.parquet")


def test_convert_shards_on_s3(s3):
    """`distill convert-shards` on a run folder in a bucket: the old objects kept aside, both
    stages up to date (no teacher) from the converted objects."""
    from pathlib import Path

    import s3fs

    import stages.filter.stage as filter_stage
    import stages.generate.stage as generate
    from pipeline.config import load_config
    from pipeline.schema import shard_format
    from stages.commands.convert import convert_run

    fixture = Path(__file__).parent / "fixtures" / "run-before-house"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(fixture), f"{s3}/old".removeprefix("s3://"), recursive=True)
    run = RunFolder(f"{s3}/old")
    convert_run(run)
    folder = run.stage("generate")
    assert {shard_format(folder.read_checked(e).schema)
            for e in folder.manifest()["files"]} == {2}
    assert len([f for f in fs.find(f"{s3}/old/generate/by-fingerprint")
                if f.endswith(".parquet")]) == 2

    def no_teacher():
        raise AssertionError("nothing may be generated again")

    cfg = load_config("configs/demo.yaml", [
        "task.n_train=8", "generate.rows_per_shard=4", "generate.n_samples=2",
        "generate.top_k=3", "generate.backend=hf", "filter.min_steps=0"])
    assert generate.main(cfg, RunFolder(f"{s3}/old"), teacher=no_teacher)["files"] == \
        folder.manifest()["files"]
    assert filter_stage.main(cfg, RunFolder(f"{s3}/old"))["files"] == \
        run.stage("filter").manifest()["files"]
