"""The filter folder is a Hugging Face dataset: `load_dataset(<run>/filter)` gives the kept
traces, the `rejected` configuration the rejected ones with their reasons, and the
`prompt_completion` / `messages` configurations the SFT pairs; no empty shard breaks a load."""

import json

import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.run_folder import RunFolder
from stages.commands.cli import run_stages
from stages.commands.import_traces import import_traces

QUESTIONS = [(f"Tom has {a} apples. He gets {b} more. How many apples does he have now?", a, b)
             for a, b in [(5, 3), (7, 2), (4, 4), (9, 1), (6, 5), (3, 8), (2, 2), (1, 6)]]


def _cfg(*extra):
    return load_config("configs/demo.yaml", ["generate.rows_per_shard=4", *extra])


def test_load_dataset_takes_the_filter_folder_with_empty_shards(tmp_path, embedded_path):
    from datasets import load_dataset

    # shard 0: all four right (rejects nothing); shard 1: all four wrong (keeps nothing)
    rows = [{"question": q, "rationale": f"Tom starts with {a} and gets {b}, so {a} + {b} = "
             f"{a + b}.", "answer": str(a + b if i < 4 else a + b + 1)}
            for i, (q, a, b) in enumerate(QUESTIONS)]
    for r in rows[4:]:
        r["rationale"] = r["rationale"].replace(" = ", " = 1")  # 5 + 3 = 18: wrong arithmetic
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run = RunFolder(tmp_path / "run")
    import_traces(_cfg(), run, "table", [str(path)])
    run_stages(["filter"], _cfg(), run)
    manifest = run.stage("filter").manifest()
    shards = {s["name"]: s["outputs"] for s in manifest["shards"]}
    assert [o["kept"]["rows"] for o in shards.values()] == [4, 0]
    assert [o["rejected"]["rows"] for o in shards.values()] == [0, 4]
    folder = tmp_path / "run" / "filter"
    # an empty shard has its schema and no row group: a plain glob over the files loads too
    empty = pq.ParquetFile(folder / shards["00001"]["kept"]["file"])
    assert empty.metadata.num_row_groups == 0 and "rationale" in empty.schema_arrow.names
    assert load_dataset("parquet", data_files=str(folder / "kept-*.parquet"),
                        split="train").num_rows == 4

    kept = load_dataset(str(folder), split="train")
    assert kept.num_rows == manifest["counters"]["kept"] == 4
    assert {"question", "rationale", "completion", "token_ids"} <= set(kept.column_names)
    rejected = load_dataset(str(folder), "rejected", split="train")
    assert rejected.num_rows == 4 and set(rejected["reason"]) == {"wrong_arithmetic"}

    pairs = load_dataset(str(folder), "prompt_completion", split="train")
    assert set(pairs.column_names) == {"task", "prompt", "completion"}
    assert pairs.num_rows == 8 and sorted(set(pairs["task"])) == ["explain", "predict"]
    first = [p for p in pairs if p["task"] == "predict"][0]
    assert first["prompt"] == f"predict: {QUESTIONS[0][0]}\n" and first["completion"] == "8"
    explain = [p for p in pairs if p["task"] == "explain"][0]
    assert explain["completion"].endswith("5 + 3 = 8.")
    chats = load_dataset(str(folder), "messages", split="train")
    assert chats[0]["messages"][0]["role"] == "user"
    assert chats[0]["messages"][1] == {"role": "assistant", "content": "8"}

    card = (folder / "README.md").read_text()
    assert "| wrong_arithmetic | 4 |" in card and "kept-00001.parquet" not in card
