"""lm-evaluation-harness tasks for a run's held-out set, in both of the student's modes.

    python -m stages.commands.lm_eval_task --config configs/demo.yaml --out lm_eval/demo
    lm_eval run --model hf --model_args pretrained=data/runs/demo/export/train-dss-s0 \\
        --tasks stepdistill_demo_predict stepdistill_demo_explain --include_path lm_eval/demo

Writes `test.jsonl` (the task's held-out rows: id, question, gold) and one task file per
mode: `predict:` is scored on the first number of the answer, `explain:` on the last number of
the rationale (for numeric tasks; our eval also reads "The answer is" markers first, which
the demo's rationales end with anyway), both by exact match, greedy. The data path inside the
task files is relative to the folder lm_eval runs in (the repository root for the shipped
demo files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

NUMBER = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)"


def task_files(name: str, data_file: str, max_tokens: dict[str, int]) -> dict[str, dict]:
    """{file name: task} for the two modes."""
    tasks = {}
    for mode in ("predict", "explain"):
        task = {
            "task": f"stepdistill_{name}_{mode}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": data_file}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": f"{mode}: {{{{question}}}}\n",
            "doc_to_target": "{{gold}}",
            "generation_kwargs": {"until": [],
                                  "do_sample": False, "max_gen_toks": max_tokens[mode]},
            "filter_list": [{"name": "answer", "filter": [
                {"function": "regex", "regex_pattern": NUMBER,
                 "group_select": 0 if mode == "predict" else -1},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True, "regexes_to_ignore": [","]}],
            "metadata": {"version": 1.0},
        }
        tasks[f"stepdistill_{name}_{mode}.yaml"] = task
    return tasks


def write_tasks(cfg, name: str, out: Path, data_file: str | None = None) -> list[Path]:
    """Write the held-out rows and the two task files into `out`."""
    from pipeline.tasks import load_split

    rows = load_split(cfg.task, "test").select(["id", "question", "gold"]).to_pylist()
    if not rows:
        raise ValueError("the task's test split is empty: nothing to evaluate")
    out.mkdir(parents=True, exist_ok=True)
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = cfg.eval
    written = [out / "test.jsonl"]
    files = task_files(name, data_file or str(out / "test.jsonl"),
                       {"predict": e.predict_max_new_tokens, "explain": e.max_new_tokens})
    for file, task in files.items():
        (out / file).write_text(yaml.safe_dump(task, sort_keys=False, width=100))
        written.append(out / file)
    return written


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from stages.commands.cli import reported

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--config", default="configs/demo.yaml",
                        help="the run's config, whose task gives the held-out set "
                        "(default: %(default)s)")
    parser.add_argument("--name", default="demo", help="task name part (default: %(default)s)")
    parser.add_argument("--out", default="lm_eval/demo", help="folder to write "
                        "(default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)

    def work() -> None:
        cfg = load_config(args.config, args.overrides)
        for path in write_tasks(cfg, args.name, Path(args.out)):
            print(path)

    return reported(work)


if __name__ == "__main__":
    sys.exit(main())
