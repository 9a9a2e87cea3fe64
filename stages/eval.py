"""Stage 4, eval: teacher, base student and distilled students on the held-out split.

Every finished student of the run is scored (train/ and each named variant's train-<name>/,
or those in `eval.variants`), so variants trained on the same traces land in one table.
Each system's predictions are cached in `eval/<system>[-<variant>].parquet` under a
fingerprint of what produced them, so retraining a student does not re-run the teacher.
Writes `report.json` and prints the table.
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


def label(result: dict) -> str:
    variant = result.get("variant")
    if variant:  # a named student: train-<name>/
        return f"distilled {variant} ({result['system']}:)"
    return LABELS.get(result["system"], result["system"])


def report_table(results: list[dict]) -> str:
    width = max([32] + [len(label(r)) + 2 for r in results])
    lines = [f"{'system':<{width}}{'n':>6}{'accuracy':>10}{'tokens/answer':>15}",
             "-" * (width + 31)]
    for r in results:
        lines.append(f"{label(r):<{width}}{r['n']:>6}"
                     f"{100 * r['accuracy']:>9.1f}%{r['mean_tokens']:>15.1f}")
    return "\n".join(lines)


def trained_variants(run_dir: Path, wanted: list[str] | None) -> list[str]:
    """train.name of every finished student in the run ('' = train/), or the `wanted` ones,
    each checked to be there."""
    from stages.train import train_dir

    def finished(name: str) -> bool:
        d = train_dir(run_dir, name)
        return store.read_manifest(d) is not None and (d / "adapter").is_dir()

    if wanted is None:
        found = [""] if finished("") else []
        found += sorted(d.name[len("train-"):] for d in run_dir.glob("train-*")
                        if d.is_dir() and finished(d.name[len("train-"):]))
        return found
    missing = [n for n in wanted if not finished(n)]
    if missing:
        raise FileNotFoundError(
            f"eval.variants names students that are not trained in {run_dir}: "
            + ", ".join(repr(n) for n in missing) + "; train each with `make train "
            "SET=\"train.name=<name> ...\"` first, or leave eval.variants unset to score every "
            "finished one")
    return list(wanted)


def _rows_digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r['id']}\x1f{r['question']}\x1f{r['gold']}\x1e".encode())
    return h.hexdigest()[:16]


def eval_checker(cfg: Config):
    """The task's answer kind with the flexible extractor order (a fallback is allowed)."""
    from pipeline.config import answer_kind
    from stages.answers import AnswerChecker

    kind = answer_kind(cfg.task)
    return AnswerChecker(kind, labels=cfg.task.labels if kind == "label" else None,
                         tolerance=cfg.filter.tolerance)


def main(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    from pipeline.models import load_tokenizer, resolve_model
    from stages.backends import HFBackend
    from stages.generate import PromptTemplate
    from stages.train import train_dir
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
    checker = eval_checker(cfg)
    digest = _rows_digest(rows)
    common = {"test": digest, "answer_kind": checker.kind, "dtype": e.dtype}
    if checker.kind == "label":
        common["labels"] = checker.labels
    wants_student = any(s in ("predict", "explain") for s in e.systems)
    variants = trained_variants(run_dir, e.variants) if wants_student else []
    if wants_student and not variants:
        raise FileNotFoundError(f"no finished train stage in {run_dir}; run `make train` "
                                "first, or set eval.systems=[teacher,base]")
    template = PromptTemplate(g.prompt_template)
    specs = {
        "teacher": {"model": g.model, "template": template.sha256, "chat": g.chat_template,
                    "stop": g.stop, "max_new_tokens": e.max_new_tokens},
        "base": {"model": t.student, "max_new_tokens": e.predict_max_new_tokens,
                 "first_line": True},
    }
    if g.backend == "openai":  # the teacher is only reachable through its API
        specs["teacher"].update(base_url=g.base_url, endpoint=g.endpoint)
    jobs = [(s, "") for s in e.systems if s in specs]
    for variant in variants:
        manifest = store.read_manifest(train_dir(run_dir, variant))
        adapter = store.manifest_digest(manifest)
        for s in ("predict", "explain"):
            if s in e.systems:
                key = f"{s}-{variant}" if variant else s
                specs[key] = {"adapter": adapter, "first_line": s == "predict",
                              "student": manifest["facts"]["student"],
                              "max_new_tokens": e.predict_max_new_tokens if s == "predict"
                              else e.max_new_tokens}
                jobs.append((s, variant))
    results, computed = [], 0
    loaded: dict[str, HFBackend] = {}
    for system, variant in jobs:
        key = f"{system}-{variant}" if variant else system
        spec = {**specs[key], **common}
        fp = store.fingerprint(system, spec)
        path = stage_dir / f"{key}.parquet"
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
            if variant not in loaded:
                loaded.clear()  # one distilled student in memory at a time
                adapter_dir = train_dir(run_dir, variant) / "adapter"
                student = specs[key]["student"]
                model = load_distilled(resolve_model(student), str(adapter_dir), e.dtype)
                loaded[variant] = HFBackend(f"{student}+{adapter_dir.parent.name}", e.dtype,
                                            loaded=(model, load_tokenizer(str(adapter_dir))))
            backend = loaded[variant]
            prefix = PREDICT if system == "predict" else EXPLAIN
            prompts, stop = [task_prompt(prefix, q) for q in questions], []
            budget = specs[key]["max_new_tokens"]
        table, summary = run_system(system, backend, prompts, rows, budget, stop,
                                    e.batch_size, checker,
                                    first_line=specs[key].get("first_line", False))
        if variant:
            summary["variant"] = variant
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
        [(r["system"], r.get("variant", "")) for r in results], specs, common), "settings": cfg.section("eval"),
        "results": results, "files": [{"file": f"{r['system']}-{r['variant']}.parquet" if r.get("variant")
                   else f"{r['system']}.parquet"} for r in results]})
    print(report_table(results))
    return report
