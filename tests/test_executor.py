"""The local executor and the run folder: reuse, resume, settings changes, atomic writes."""

import pyarrow as pa
import pytest

from pipeline.executors import run_stage
from pipeline.fingerprints import fingerprint
from pipeline.run_folder import RunFolder
from pipeline.stage import Shard, ShardOutput, Stage


def _shards(n=4, tag=""):
    return [Shard(f"{i:05d}", f"sum{i}{tag}", 2, lambda i=i: pa.table({"x": [i, i + 1]}))
            for i in range(n)]


class Doubler:
    """A shard function that records which shards it was called on."""

    def __init__(self, crash_after=None):
        self.calls, self.crash_after, self.built = [], crash_after, 0

    def resources(self):
        self.built += 1
        return "resource"

    def __call__(self, params, shard, resources, progress):
        assert resources == "resource" and params == {"factor": 2}
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(shard.name)
        table = shard.load()
        progress(table.num_rows)
        doubled = pa.table({"x": [2 * v for v in table.column("x").to_pylist()]})
        return ShardOutput({"out": doubled}, {"rows": table.num_rows}, {"made_by": "doubler"})


def run(folder, fn, settings=None, shards=None):
    settings = settings or {"k": 1}
    stage = Stage(name="s", fingerprinted=settings, shards=shards or _shards(), work=fn,
                  settings={"factor": 2}, outputs=["out"],
                  resources=fn.resources, facts={"k": 1})
    return run_stage(stage, folder)


@pytest.fixture
def folder(tmp_path):
    return RunFolder(tmp_path / "run").stage("s")


def test_complete_run_then_up_to_date(folder, capsys):
    fn = Doubler()
    m = run(folder, fn)
    assert m["counters"] == {"rows": 8} and len(m["files"]) == 4 and fn.built == 1
    assert m["facts"] == {"k": 1, "made_by": "doubler"}
    again = Doubler()
    run(folder, again)
    assert again.calls == [] and again.built == 0  # nothing to do: no resources are built
    assert "up to date" in capsys.readouterr().err


def test_crash_then_resume_redoes_only_missing_shards(folder):
    with pytest.raises(KeyboardInterrupt):
        run(folder, Doubler(crash_after=2))
    assert folder.manifest() is None  # no manifest: the stage is not done
    resumed = Doubler()
    m = run(folder, resumed)
    assert resumed.calls == ["00002", "00003"]
    assert m["shards_reused"] == 2 and m["facts"]["made_by"] == "doubler"
    table = folder.read_tables(m["files"])
    assert table.column("x").to_pylist() == [0, 2, 2, 4, 4, 6, 6, 8]


def test_deleted_shard_is_redone_alone(folder):
    run(folder, Doubler())
    folder.remove("out-00001.parquet")
    again = Doubler()
    run(folder, again)
    assert again.calls == ["00001"]


def test_changed_settings_redo_everything_and_say_why(folder, capsys):
    run(folder, Doubler())
    again = Doubler()
    run(folder, again, settings={"k": 2})
    assert len(again.calls) == 4
    assert "k: 1 -> 2" in capsys.readouterr().err


def test_another_set_of_shards_reuses_the_done_ones_and_says_so(folder, capsys):
    """eval of other systems asks for another set of shards: nothing is called damaged."""
    run(folder, Doubler())
    capsys.readouterr()
    again = Doubler()
    m = run(folder, again, shards=_shards(2))
    assert again.calls == [] and m["shards_reused"] == 2
    err = capsys.readouterr().err
    assert "another set of shards" in err and "damaged" not in err
    changed = _shards(2)
    changed[1] = Shard("00001", "changed", 2, changed[1].load)
    run(folder, Doubler(), shards=changed)
    assert "damaged or made from another input" in capsys.readouterr().err


def test_changed_input_shard_is_redone_and_stale_outputs_removed(folder):
    run(folder, Doubler())
    shards = _shards(3)
    shards[1] = Shard("00001", "changed", 2, shards[1].load)
    again = Doubler()
    m = run(folder, again, shards=shards)
    assert again.calls == ["00001"]
    assert folder.files(".parquet") == ["out-00000.parquet", "out-00001.parquet",
                                        "out-00002.parquet"]
    assert len(m["files"]) == 3


def test_tables_are_written_atomically_and_describe_themselves(folder):
    entry = folder.write_table("a.parquet", pa.table({"x": [1]}), {"fingerprint": "f"})
    assert entry["rows"] == 1 and len(entry["sha256"]) == 64
    assert folder.entry("a.parquet") == entry
    assert folder.table_meta("a.parquet")["fingerprint"] == "f"
    assert folder.files() == ["a.parquet"]  # no temporary file is left behind
    assert folder.table_meta("missing.parquet") is None


def test_a_log_is_rewritten_whole_and_a_torn_last_line_is_dropped(folder):
    folder.write_jsonl("log.jsonl", [{"step": 1}, {"step": 2}])
    assert folder.read_jsonl("log.jsonl") == [{"step": 1}, {"step": 2}]
    with open(folder.path("log.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')  # a crash in the middle of a write of another tool
    assert folder.read_jsonl("log.jsonl") == [{"step": 1}, {"step": 2}]


def test_a_stage_runs_on_an_fsspec_url_as_on_a_local_disk():
    """The executor and the run folder only speak fsspec: an in-memory file system holds a
    whole stage (object storage is the same code with another URL)."""
    run_folder = RunFolder(f"memory://runs/{id(object())}")
    folder = run_folder.stage("s")
    m = run(folder, Doubler())
    assert m["counters"] == {"rows": 8} and folder.intact(m)
    assert folder.read_tables(m["files"]).num_rows == 8
    again = Doubler()
    run(folder, again)
    assert again.calls == []
    with pytest.raises(Exception, match="local disk"):
        folder.local.path("checkpoints", "training checkpoints")


# ---------------------------------------------------------------- job arrays

def _stage(fn, settings=None, shards=None):
    settings = settings or {"k": 1}
    return Stage(name="s", fingerprinted=settings, shards=shards or _shards(5), work=fn,
                 settings={"factor": 2}, outputs=["out"],
                 resources=fn.resources, facts={"k": 1})


def _worker(i, n):
    from pipeline.executors import executor_for
    from pipeline.executors.array import ArrayRole
    return executor_for(role=ArrayRole(n, i))


def _finalizer():
    from pipeline.executors.array import ArrayRole, ArrayWorker
    return ArrayWorker(ArrayRole(finalize=True))


def test_array_workers_then_finalize_equal_a_local_run(tmp_path):
    local = RunFolder(tmp_path / "local").stage("s")
    expected = run_stage(_stage(Doubler()), local)
    folder = RunFolder(tmp_path / "array").stage("s")
    fns = [Doubler(), Doubler()]
    for i, fn in enumerate(fns):
        assert run_stage(_stage(fn), folder, executor=_worker(i, 2)) is None
        assert folder.manifest() is None  # workers never commit
    assert fns[0].calls == ["00000", "00002", "00004"] and fns[1].calls == ["00001", "00003"]
    manifest = run_stage(_stage(Doubler()), folder, executor=_finalizer())
    assert manifest["counters"] == expected["counters"]
    assert [f["sha256"] for f in manifest["files"]] == [f["sha256"] for f in expected["files"]]
    again = Doubler()  # the plain command now finds the stage up to date
    run_stage(_stage(again), folder)
    assert again.calls == []


def test_finalize_names_missing_shards_and_a_rerun_worker_fills_them(tmp_path):
    from pipeline.run_folder import RunFolderError
    folder = RunFolder(tmp_path / "run").stage("s")
    with pytest.raises(RunFolderError, match="no worker has started"):
        run_stage(_stage(Doubler()), folder, executor=_finalizer())
    run_stage(_stage(Doubler()), folder, executor=_worker(0, 3))
    crashing = Doubler(crash_after=1)
    with pytest.raises(KeyboardInterrupt):
        run_stage(_stage(crashing), folder, executor=_worker(1, 3))
    with pytest.raises(RunFolderError, match=r"2 of 5 shards are not done: 00002 \(#2\), "
                       r"00004 \(#4\)\. Worker I of N does shards #I, #I\+N"):
        run_stage(_stage(Doubler()), folder, executor=_finalizer())
    rerun = Doubler()
    run_stage(_stage(rerun), folder, executor=_worker(1, 3))
    assert rerun.calls == ["00004"]  # 00001 was done before the crash and is kept
    run_stage(_stage(Doubler()), folder, executor=_worker(2, 3))
    manifest = run_stage(_stage(Doubler()), folder, executor=_finalizer())
    assert manifest["counters"] == {"rows": 10} and manifest["shards_reused"] == 5


def test_a_worker_with_other_settings_refuses_and_deletes_nothing(tmp_path):
    from pipeline.executors.array import ArrayRole, ArrayWorker
    from pipeline.run_folder import RunFolderError
    folder = RunFolder(tmp_path / "run").stage("s")
    run_stage(_stage(Doubler()), folder, executor=_worker(0, 2))
    before = folder.files(".parquet")
    other = Doubler()
    with pytest.raises(RunFolderError, match=r"other settings \(k: 1 -> 2\).*--plan-only --force"):
        run_stage(_stage(other, {"k": 2}), folder, executor=_worker(1, 2))
    with pytest.raises(RunFolderError, match="--force cannot be given to an array worker"):
        run_stage(_stage(Doubler(), {"k": 2}), folder, force=True, executor=_worker(1, 2))
    with pytest.raises(RunFolderError, match="input of .* differs"):
        run_stage(_stage(Doubler(), shards=_shards(5, tag="x")), folder, executor=_worker(1, 2))
    assert other.calls == [] and folder.files(".parquet") == before
    # the documented way to start over: --plan-only --force once, then the workers
    ArrayWorker(ArrayRole(plan_only=True)).run(_stage(Doubler(), {"k": 2}), folder, force=True)
    assert folder.files(".parquet") == [] and folder.plan()["fingerprint"] == fingerprint({"k": 2})
    run_stage(_stage(Doubler(), {"k": 2}), folder, executor=_worker(1, 2))


def test_bad_worker_index_is_a_clear_error():
    from pipeline.executors.array import ArrayRole
    with pytest.raises(ValueError, match=r"--worker-index must be in 0..1 .*SLURM_ARRAY_TASK_ID"):
        ArrayRole(2, 2)


def test_create_if_absent_through_fsspec_keeps_the_first_file():
    folder = RunFolder("memory://excl/run").stage("s")
    assert folder.create_json("plan.json", {"by": 1}) is True
    assert folder.create_json("plan.json", {"by": 2}) is False
    assert folder.read_json("plan.json") == {"by": 1}


def test_create_if_absent_has_exactly_one_winner(tmp_path):
    """Racing writers on a local disk (S3's conditional PUT is tested in test_s3.py)."""
    import threading
    folder = RunFolder(tmp_path / "run").stage("s")
    wins, barrier = [], threading.Barrier(8)

    def claim(i):
        barrier.wait()
        if folder.create_json("plan.json", {"by": i}):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and folder.read_json("plan.json") == {"by": wins[0]}
    assert folder.files() == ["plan.json"]  # no temporary file left behind
