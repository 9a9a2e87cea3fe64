"""Stage 4, eval: teacher, base student and distilled student on the held-out split.

Each system's predictions are cached in `eval/<system>.parquet` under a fingerprint of what
produced them, so retraining the student does not re-run the teacher. Writes `report.json`
and prints the table.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from pipeline import store
from pipeline.config import Config
from pipeline.runner import log
from pipeline.tasks import load_split

LABELS = {"teacher": "teacher (few-shot CoT)", "base": "base student (predict:)",
          "predict": "distilled student (predict:)", "explain": "distilled student (explain:)"}


def report_table(results: list[dict]) -> str:
    lines = [f"{'system':<32}{'n':>6}{'accuracy':>10}{'tokens/answer':>15}",
             "-" * 63]
    for r in results:
        lines.append(f"{LABELS.get(r['system'], r['system']):<32}{r['n']:>6}"
                     f"{100 * r['accuracy']:>9.1f}%{r['mean_tokens']:>15.1f}")
    return "\n".join(lines)


def _rows_digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r['id']}\x1f{r['question']}\x1f{r['gold']}\x1e".encode())
    return h.hexdigest()[:16]


def main(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    from pipeline.models import load_tokenizer, resolve_model
    from stages.backends import HFBackend
    from stages.generate import PromptTemplate
    from trainer.evaluate import run_system
    from trainer.examples import EXPLAIN, PREDICT, task_prompt
    from trainer.model import load_distilled

    e, g, t = cfg.eval, cfg.generate, cfg.train
    stage_dir = run_dir / "eval"
    stage_dir.mkdir(parents=True, exist_ok=True)
    test = load_split(cfg.task, "test")
    if e.n is not None:
        test = test.slice(0, e.n)
    rows = test.to_pylist()
    if not rows:
        raise ValueError("the held-out split is empty; set task.n_test / task.test_path")
    numeric = cfg.task.kind in ("demo", "gsm8k") or cfg.task.answer_type == "numeric"
    digest = _rows_digest(rows)
    common = {"test": digest, "numeric": numeric, "dtype": e.dtype}
    train_manifest = store.read_manifest(run_dir / "train")
    wants_student = any(s in ("predict", "explain") for s in e.systems)
    if wants_student and train_manifest is None:
        raise FileNotFoundError(f"no finished train stage in {run_dir / 'train'}; run "
                                "`make train` first, or set eval.systems=[teacher,base]")
    template = PromptTemplate(g.prompt_template)
    adapter = store.manifest_digest(train_manifest) if train_manifest else None
    specs = {
        "teacher": {"model": g.model, "template": template.sha256, "chat": g.chat_template,
                    "stop": g.stop, "max_new_tokens": e.max_new_tokens},
        "base": {"model": t.student, "max_new_tokens": e.predict_max_new_tokens,
                 "first_line": True},
        "predict": {"adapter": adapter, "max_new_tokens": e.predict_max_new_tokens,
                    "first_line": True},
        "explain": {"adapter": adapter, "max_new_tokens": e.max_new_tokens},
    }
    if g.backend == "openai":  # the teacher is only reachable through its API
        specs["teacher"].update(base_url=g.base_url, endpoint=g.endpoint)
    results, computed = [], 0
    distilled = None
    for system in e.systems:
        spec = {**specs[system], **common}
        fp = store.fingerprint(system, spec)
        path = stage_dir / f"{system}.parquet"
        meta = store.shard_meta(path) if path.is_file() else None
        if meta and meta.get("fingerprint") == fp and not force:
            results.append(meta["summary"])
            continue
        questions = [r["question"] for r in rows]
        if system == "teacher":
            log("eval", f"teacher {g.model}: few-shot chain of thought")
            if g.backend == "openai":  # requests cached in eval/requests.sqlite
                from stages.backends import make_backend

                backend = make_backend(g, stage_dir)
            else:  # vllm's teacher is local too: its weights run here through transformers
                backend = HFBackend(g.model, e.dtype, g.chat_template)
            prompts, stop, budget = [template.render(q) for q in questions], g.stop, \
                e.max_new_tokens
        elif system == "base":
            backend = HFBackend(t.student, e.dtype)
            prompts, stop, budget = [task_prompt(PREDICT, q) for q in questions], [], \
                e.predict_max_new_tokens
        else:
            if distilled is None:
                adapter_dir = run_dir / "train" / "adapter"
                model = load_distilled(resolve_model(t.student), str(adapter_dir), e.dtype)
                distilled = HFBackend(f"{t.student}+{adapter_dir.name}", e.dtype,
                                      loaded=(model, load_tokenizer(str(adapter_dir))))
            backend = distilled
            if system == "predict":
                prompts, stop, budget = [task_prompt(PREDICT, q) for q in questions], [], \
                    e.predict_max_new_tokens
            else:
                prompts, stop, budget = [task_prompt(EXPLAIN, q) for q in questions], [], \
                    e.max_new_tokens
        table, summary = run_system(system, backend, prompts, rows, budget, stop,
                                    e.batch_size, numeric,
                                    first_line=specs[system].get("first_line", False))
        store.write_shard(path, table, {"stage": "eval", "fingerprint": fp, "spec": spec,
                                        "summary": summary})
        results.append(summary)
        computed += 1
    if computed == 0:
        log("eval", "up to date: every system's predictions are cached")
    report = {"results": results, "n": len(rows), "test_digest": digest,
              "task": cfg.section("task"), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    store.write_json_atomic(stage_dir / "report.json", report)
    store.write_manifest(stage_dir, {"stage": "eval", "fingerprint": store.fingerprint(
        [r["system"] for r in results], specs, common), "settings": cfg.section("eval"),
        "results": results, "files": [{"file": f"{r['system']}.parquet"} for r in results]})
    print(report_table(results))
    return report
