"""Scaling out: the Ray executor on a local cluster and job-array workers in separate processes,
on a toy stage and on a transformers teacher (the tiny random model; marked slow: each Ray
test starts a local cluster; CI runs them)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline import topk_codec
from pipeline.schema import logical
from pipeline.config import Config, load_config
from pipeline.executors.ray import RayConfig
from pipeline.executors import executor_for, run_stage
from pipeline.run_folder import RunFolder
from pipeline.stage import Shard, ShardOutput, Stage

pytestmark = pytest.mark.slow

RAY = RayConfig(local_cpus=2, max_retries=2)


@pytest.fixture(autouse=True)
def _by_value():
    """Ray workers cannot import this test module: send its functions by value."""
    pytest.importorskip("ray")
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def dying_doubler(params, shard, resources, progress):
    """Doubles `x`; the process that first reaches shard `params['die_on']` kills itself (as
    the OOM killer would), and every shard in `params['fail']` raises."""
    if shard.name == params.get("die_on") and not os.path.exists(params["marker"]):
        open(params["marker"], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    if shard.name in params.get("fail", ()):
        raise ValueError(f"bad rows in {shard.name}")
    table = shard.load()
    progress(table.num_rows, tokens=3)
    return ShardOutput({"out": pa.table({"x": [2 * v for v in table.column("x").to_pylist()],
                                         "pid": [os.getpid()] * table.num_rows})},
                       {"rows": table.num_rows})


def toy_stage(params, n=6):
    shards = [Shard(f"{i:05d}", f"sum{i}", 2, lambda i=i: pa.table({"x": [10 * i, 10 * i + 1]}))
              for i in range(n)]
    return Stage(name="toy", fingerprinted={"k": 1}, shards=shards, work=dying_doubler,
                 settings=params, outputs=["out"],
                 resources=lambda: None, rates=("tokens",))


def test_ray_worker_killed_mid_run_loses_and_duplicates_no_row(tmp_path, capsys):
    folder = RunFolder(tmp_path / "run").stage("toy")
    params = {"die_on": "00002", "marker": str(tmp_path / "died")}
    manifest = run_stage(toy_stage(params), folder,
                         executor=executor_for("ray", 2, Config(ray=RAY)))
    assert os.path.exists(params["marker"])  # a worker did die
    assert "shard 00002: its worker died" in capsys.readouterr().err
    table = folder.read_tables(manifest["files"], each=logical)
    assert table.column("x").to_pylist() == [v for i in range(6) for v in (20 * i, 20 * i + 2)]
    assert manifest["counters"] == {"rows": 12} and manifest["shards_written"] == 6
    assert len(set(table.column("pid").to_pylist())) >= 2  # the shards were spread out
    assert set(table.column("pid").to_pylist()).isdisjoint({os.getpid()})


def test_ray_shard_that_keeps_failing_stops_the_stage_and_keeps_the_rest(tmp_path):
    folder = RunFolder(tmp_path / "run").stage("toy")
    params = {"fail": ["00004"]}
    with pytest.raises(RuntimeError, match=r"toy: 1 shard\(s\) could not be made: 00004 failed 3 "
                       r"times \(last: it failed: ValueError: bad rows in 00004\)\. The 5 other "
                       r"shards are written and kept"):
        run_stage(toy_stage(params), folder, executor=executor_for("ray", 2, Config(ray=RAY)))
    assert folder.manifest() is None
    assert "out-00004.parquet" not in folder.files() and len(folder.files(".parquet")) == 5
    # fixed: the rerun (local this time) does only the failed shard
    manifest = run_stage(toy_stage({}), folder)
    assert manifest["shards_written"] == 1 and manifest["shards_reused"] == 5


# ---------------------------------------------------------------- a transformers teacher

TEACHER = ["generate.backend=hf", "generate.dtype=float32", "task.n_train=8",
        "generate.rows_per_shard=2", "generate.n_samples=2", "generate.max_new_tokens=16",
        "generate.batch_size=4"]
COLUMNS = ["id", "sample", "completion", "finish_reason", "token_ids", "topk_ids",
           "topk_logprobs", "token_logprobs"]


def _traces(run_dir, stage="generate"):
    folder = RunFolder(run_dir).stage(stage)
    manifest = folder.manifest()
    return manifest, folder.read_tables(manifest["files"], each=logical).select(COLUMNS)


def _same_rows(a: pa.Table, b: pa.Table) -> None:
    for col in ("id", "sample", "completion", "finish_reason", "token_ids", "topk_ids"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    for col in ("topk_logprobs", "token_logprobs"):  # thread counts differ: float sums may too
        x = np.concatenate([np.ravel(np.array(v, dtype=np.float64)) for v in
                            a.column(col).to_pylist()])
        y = np.concatenate([np.ravel(np.array(v, dtype=np.float64)) for v in
                            b.column(col).to_pylist()])
        if col == "topk_logprobs":
            # the compact store quantises top-k entries to steps of 2^-5 nats (topk_codec): a
            # float difference of 1e-6 that crosses a rounding boundary moves one entry a step
            step = 2.0 ** -topk_codec.DEFAULT_STEP_EXP
            np.testing.assert_allclose(x, y, atol=step + 1e-4)
            assert np.mean(np.abs(x - y) > 1e-4) < 0.01, "more than 1% of entries moved a step"
        else:
            np.testing.assert_allclose(x, y, atol=1e-4)


def test_ray_and_job_array_write_the_rows_of_a_local_run(tmp_path, tiny_llama):
    """Ray: the rows of every round (a second round samples the questions still short of a
    kept trace); a job array: the rows of the first. The teacher is the tiny random model: the
    rows must be the same wherever they are made, whatever they say."""
    import stages.generate.stage as generate

    tiny = TEACHER + [f"generate.model={tiny_llama}"]

    rounds = ["generate.max_samples=4"]
    generate.main(load_config("configs/demo.yaml", tiny + rounds), tmp_path / "local")
    local_manifest, local = _traces(tmp_path / "local")
    _, local_round = _traces(tmp_path / "local", "generate-round-2")
    assert local_round.num_rows > 0

    ray_cfg = load_config("configs/demo.yaml", tiny + rounds + [
        "generate.executor=ray", "generate.workers=2", "ray.local_cpus=2"])
    generate.main(ray_cfg, tmp_path / "ray")
    ray_manifest, on_ray = _traces(tmp_path / "ray")
    _same_rows(local, on_ray)
    assert ray_manifest["fingerprint"] == local_manifest["fingerprint"]
    assert _untimed(ray_manifest["counters"]) == _untimed(local_manifest["counters"])
    _same_rows(local_round, _traces(tmp_path / "ray", "generate-round-2")[1])

    # two array workers at once, as a scheduler would start them, then --finalize
    cmd = [sys.executable, "-m", "stages.commands.cli", "generate", "--config",
           "configs/demo.yaml", "--runs-dir", str(tmp_path), "--run", "array"]
    workers = [subprocess.Popen(cmd + ["--num-workers", "2", "--worker-index", str(i)] + tiny,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [w.communicate(timeout=600)[1] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], errs
    assert "worker 1 of 2: 2 shard(s) written" in errs[1]
    assert RunFolder(tmp_path / "array").stage("generate").manifest() is None
    done = subprocess.run(cmd + ["--finalize"] + tiny, stderr=subprocess.PIPE, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    array_manifest, on_array = _traces(tmp_path / "array")
    _same_rows(local, on_array)
    assert _untimed(array_manifest["counters"]) == _untimed(local_manifest["counters"])


def _untimed(counters: dict) -> dict:
    """A generate stage's counters but its engine seconds (the ledger's timing: its cost
    follows from them only with generate.price_hour set, 0 here)."""
    assert counters.get("cost", 0) == 0
    return {k: v for k, v in counters.items() if k != "engine_s"}


# ---------------------------------------------------------------- multi-process training

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run-before-house")
TRAIN = ["--config", "configs/demo.yaml", "task.n_train=8", "generate.rows_per_shard=4",
         "generate.n_samples=2", "generate.top_k=3", "generate.backend=hf", "filter.min_steps=0",
         "train.dtype=float32", "train.max_steps=3", "train.batch_size=2", "train.save_steps=2"]


def _distill() -> str:
    return os.path.join(os.path.dirname(sys.executable), "distill")


def _train_in_two_processes(launcher, runs_dir, student, env=None):
    cmd = launcher + [_distill(), "--" if "torch.distributed.run" in launcher else "train"]
    if cmd[-1] == "--":
        cmd.append("train")
    cmd += ["--runs-dir", str(runs_dir), "--run", "r"] + TRAIN + [f"train.student={student}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_torchrun_trains_one_student_in_two_processes_and_resumes(tmp_path, tiny_llama):
    """The student is the tiny random model: what is checked is who trains which step."""
    import json
    import shutil

    shutil.copytree(FIXTURE, tmp_path / "r")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    done = _train_in_two_processes(torchrun, tmp_path, tiny_llama)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = RunFolder(tmp_path / "r").student()
    manifest = folder.manifest()
    assert manifest["counters"]["steps"] == 3
    assert done.stderr.count("[train] done: 3 steps") == 1  # one process speaks and writes
    ckpt = tmp_path / "r" / "train" / "checkpoints" / "checkpoint-2"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    assert (tmp_path / "r" / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "r" / "train").glob("adapter.tmp*"))

    # killed after checkpoint 2: both processes resume from it and do step 3 only
    folder.drop_manifest()
    shutil.rmtree(tmp_path / "r" / "train" / "adapter")
    shutil.rmtree(tmp_path / "r" / "train" / "checkpoints" / "checkpoint-3")
    resumed = _train_in_two_processes(torchrun, tmp_path, tiny_llama)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    again = folder.manifest()
    assert again["fingerprint"] == manifest["fingerprint"] and again["counters"]["steps"] == 3
    steps = [r["step"] for r in folder.read_jsonl("log.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))  # no step logged twice
    assert json.loads((tmp_path / "r" / "train" / "manifest.json").read_text())["files"]

    # accelerate launch with the shipped DDP config trains the same student
    shutil.copytree(FIXTURE, tmp_path / "acc" / "r")
    accelerate = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
                  "--config_file", "configs/accelerate/ddp.yaml"]
    launched = _train_in_two_processes(accelerate, tmp_path / "acc", tiny_llama,
                                       {"ACCELERATE_USE_CPU": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    other = RunFolder(tmp_path / "acc" / "r").student().manifest()
    assert other["counters"]["train_loss"] == manifest["counters"]["train_loss"]
    assert (tmp_path / "acc" / "r" / "train" / "checkpoints" / "checkpoint-2" /
            "rng_state_1.pth").is_file()


def test_filter_on_ray_writes_the_files_of_a_local_filter(tmp_path):
    import shutil

    import stages.filter.stage as filter_stage

    over = ["task.n_train=8", "generate.rows_per_shard=4", "generate.n_samples=2",
            "generate.top_k=3", "generate.backend=hf", "filter.min_steps=1"]
    for name in ("local", "ray"):
        shutil.copytree(FIXTURE, tmp_path / name)
    local = filter_stage.main(load_config("configs/demo.yaml", over), tmp_path / "local")
    on_ray = filter_stage.main(load_config("configs/demo.yaml", over + [
        "filter.executor=ray", "filter.workers=2", "ray.local_cpus=2"]), tmp_path / "ray")
    assert [f["sha256"] for f in on_ray["files"]] == [f["sha256"] for f in local["files"]]
    assert on_ray["counters"] == local["counters"] and on_ray["shards_written"] == 2
