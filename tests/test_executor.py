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
    stage = Stage(name="s", settings=settings, fingerprint=fingerprint(settings),
                  shards=shards or _shards(), work=fn, params={"factor": 2}, outputs=["out"],
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
    table = folder.read_tables([f["file"] for f in m["files"]])
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
    assert folder.read_tables([f["file"] for f in m["files"]]).num_rows == 8
    again = Doubler()
    run(folder, again)
    assert again.calls == []
    with pytest.raises(Exception, match="local disk"):
        folder.local_path("checkpoints", "training checkpoints")
