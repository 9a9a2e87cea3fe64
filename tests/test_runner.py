import pyarrow as pa
import pytest

from pipeline import store
from pipeline.runner import ShardInput, ShardOutput, run_shard_stage


def _inputs(n=4, tag=""):
    return [ShardInput(f"{i:05d}", f"sum{i}{tag}", lambda i=i: pa.table({"x": [i, i + 1]}))
            for i in range(n)]


class Doubler:
    def __init__(self, crash_after=None):
        self.calls, self.crash_after = [], crash_after

    def __call__(self, inp, table):
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(inp.name)
        doubled = pa.table({"x": [2 * v for v in table.column("x").to_pylist()]})
        return ShardOutput({"out": doubled}, {"rows": table.num_rows})


def run(tmp_path, fn, settings=None, inputs=None):
    settings = settings or {"k": 1}
    return run_shard_stage("s", tmp_path / "s", store.fingerprint(settings), settings,
                           inputs or _inputs(), fn, ["out"])


def test_complete_run_then_up_to_date(tmp_path, capsys):
    m = run(tmp_path, Doubler())
    assert m["counters"] == {"rows": 8} and len(m["files"]) == 4
    again = Doubler()
    run(tmp_path, again)
    assert again.calls == []
    assert "up to date" in capsys.readouterr().err


def test_crash_then_resume_redoes_only_missing_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, Doubler(crash_after=2))
    assert store.read_manifest(tmp_path / "s") is None  # no manifest: the stage is not done
    resumed = Doubler()
    m = run(tmp_path, resumed)
    assert resumed.calls == ["00002", "00003"]
    table = store.read_shards(tmp_path / "s", [f["file"] for f in m["files"]])
    assert table.column("x").to_pylist() == [0, 2, 2, 4, 4, 6, 6, 8]


def test_deleted_shard_is_redone_alone(tmp_path):
    run(tmp_path, Doubler())
    (tmp_path / "s" / "out-00001.parquet").unlink()
    again = Doubler()
    run(tmp_path, again)
    assert again.calls == ["00001"]


def test_changed_settings_redo_everything_and_say_why(tmp_path, capsys):
    run(tmp_path, Doubler())
    again = Doubler()
    run(tmp_path, again, settings={"k": 2})
    assert len(again.calls) == 4
    assert "k: 1 -> 2" in capsys.readouterr().err


def test_changed_input_shard_is_redone_and_stale_outputs_removed(tmp_path):
    run(tmp_path, Doubler())
    inputs = _inputs(3)
    inputs[1] = ShardInput("00001", "changed", inputs[1].load)
    again = Doubler()
    m = run(tmp_path, again, inputs=inputs)
    assert again.calls == ["00001"]
    assert sorted(p.name for p in (tmp_path / "s").glob("*.parquet")) == [
        "out-00000.parquet", "out-00001.parquet", "out-00002.parquet"]
    assert len(m["files"]) == 3


def test_write_shard_is_atomic_and_self_describing(tmp_path):
    entry = store.write_shard(tmp_path / "a.parquet", pa.table({"x": [1]}), {"fingerprint": "f"})
    assert entry["rows"] == 1 and len(entry["sha256"]) == 64
    assert store.shard_meta(tmp_path / "a.parquet")["fingerprint"] == "f"
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]
