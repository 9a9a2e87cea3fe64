"""Stage 4, eval: teacher, base student and distilled students on the held-out split.

Every finished student of the run is scored (train/ and each named variant's train-<name>/,
or those in `eval.variants`), so variants trained on the same traces land in one table. Each
system is a shard of the stage: its predictions are written to `eval/<system>[-<variant>]
.parquet`, and its checksum is what produced it (the model, the adapter's digest, the prompt
and the budget), so retraining a student redoes that student alone and never re-runs the
teacher. Writes `report.json` and prints the table.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import Config
from pipeline.executors import run_stage
from pipeline.fingerprints import fingerprint, manifest_digest
from pipeline.log import log
from pipeline.prompts import PromptTemplate
from pipeline.registry import BACKENDS
from pipeline.kept_aside import REQUEST_CACHE
from pipeline.run_folder import DamagedFile, RunFolder, as_run_folder
from pipeline.schema import PREDICTION_SCHEMA
from pipeline.stage import Progress, Shard, ShardOutput, Stage, no_progress
from pipeline.tasks import load_split
from stages.backends.base import Backend, SamplingSettings, generate_in_batches, greedy
from stages.checks.answers import NO_ANSWER, AnswerChecker, answer_checker
from stages.checks.traces import count_steps

LABELS = {"teacher": "teacher (few-shot CoT)", "base": "base student (predict:)",
          "predict": "distilled student (predict:)", "explain": "distilled student (explain:)"}
PREFIX = {"base": "predict", "predict": "predict", "explain": "explain"}


def label(result: dict) -> str:
    system, _, votes = result["system"].partition("@")
    vote = f", maj@{votes}" if votes else ""
    variant = result.get("variant")
    if variant:  # a named student: train-<name>/
        return f"distilled {variant} ({system}:{vote})"
    name = LABELS.get(system, system)
    return name[:-1] + vote + ")" if vote and name.endswith(")") else name + vote


def report_table(results: list[dict]) -> str:
    width = max([32] + [len(label(r)) + 2 for r in results])
    lines = [f"{'system':<{width}}{'n':>6}{'accuracy':>10}{'tokens/answer':>15}",
             "-" * (width + 31)]
    for r in results:
        lines.append(f"{label(r):<{width}}{r['n']:>6}"
                     f"{100 * r['accuracy']:>9.1f}%{r['mean_tokens']:>15.1f}")
    return "\n".join(lines)


@dataclass
class Job:
    """One system to score: which model, in which mode, with what budget."""

    system: str                  # teacher, base, predict, explain
    variant: str = ""            # the student's train.name ('' = train/)
    model: str = ""              # the teacher or the base student
    adapter_from: Any = None     # a distilled student's train folder (its adapter/)
    max_new_tokens: int = 16
    first_line: bool = False     # score only the first non-empty line (the predict: mode)
    spec: dict = field(default_factory=dict)   # what produced it: the shard's checksum
    votes: int = 0               # > 0: answer by majority vote over this many samples
    temperature: float = 0.0     # the voted samples' temperature

    @property
    def key(self) -> str:
        system = f"{self.system}@{self.votes}" if self.votes else self.system
        return f"{system}-{self.variant}" if self.variant else system


@dataclass
class EvalSettings:
    """What `eval_shard` needs besides the shard and the models."""

    jobs: dict[str, Job]
    template: PromptTemplate
    stop: list[str]
    batch_size: int
    checker: AnswerChecker


def prompts_for(job: Job, questions: list[str], template: PromptTemplate) -> list[str]:
    """The teacher's few-shot chain-of-thought prompt, or the student's task prompt."""
    from trainer.examples import task_prompt

    if job.system == "teacher":
        return [template.render(q) for q in questions]
    return [task_prompt(PREFIX[job.system], q) for q in questions]


def majority_vote(answers: list[str], key) -> tuple[str, int]:
    """(the answer most samples give, its votes) by `key` (the checker's canonical form, so
    "8" and "8.0" are one answer); answers that could not be read (`NO_ANSWER`) do not vote;
    a tie goes to the tied answer that came first (samples are in seed order, so the result
    does not depend on anything else). (`NO_ANSWER`, 0) when no sample gave an answer."""
    counts: dict = {}
    first: dict = {}
    for answer in answers:
        if answer == NO_ANSWER:
            continue
        k = key(answer)
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, answer)
    if not counts:
        return NO_ANSWER, 0
    best = max(counts.values())
    winner = next(k for k in first if counts[k] == best)  # dicts keep first-seen order
    return first[winner], best


def _voted_records(job: Job, rows: list[dict], prompts: list[str], outcomes: list,
                   checker: AnswerChecker) -> list[dict]:
    """One prediction per row from `job.votes` samples: the majority answer (`majority_vote`),
    the output of the first sample that gave it, and the tokens of all samples."""
    records = []
    for prompt, row, out in zip(prompts, rows, outcomes):
        if isinstance(out, str):
            records.append({"id": row["id"], "prompt": prompt, "output": "", "gold": row["gold"],
                            "pred_answer": NO_ANSWER, "extractor": None, "correct": False,
                            "n_tokens": 0, "finish_reason": f"error: {out}"[:500]})
            continue
        found = [checker.extract(g.text, row["question"]) for g in out]
        answer, votes = majority_vote([f.answer for f in found], checker.key)
        shown = next((g.text for g, f in zip(out, found) if f.answer == answer), out[0].text)
        records.append({"id": row["id"], "prompt": prompt, "output": shown, "gold": row["gold"],
                        "pred_answer": answer, "extractor": f"vote {votes}/{len(out)}",
                        "correct": answer != NO_ANSWER
                        and checker.match(answer, row["gold"], row["question"]),
                        "n_tokens": sum(int(g.token_ids.shape[0]) for g in out),
                        "finish_reason": "vote"})
    return records


def eval_shard(settings: EvalSettings, shard: Shard, models: "Models",
               progress: Progress = no_progress) -> ShardOutput:
    """Greedy answers of one system to every held-out row, each extracted and checked.

    `first_line` systems are scored on the first non-empty line of their output (the
    `predict:` mode, where the answer is the whole reply); the token count is still everything
    that was generated. Answers are read with the answer kind's flexible order (an explicit
    marker first, else a fallback such as the last number).
    """
    job = settings.jobs[shard.name]
    rows = shard.load().to_pylist()
    prompts = prompts_for(job, [r["question"] for r in rows], settings.template)
    stop = settings.stop if job.system == "teacher" else []
    t0 = time.time()
    backend = models.get(job)
    checker, records = settings.checker, []
    if job.votes:
        sampling = SamplingSettings(n=job.votes, temperature=job.temperature, top_p=1.0,
                                    max_new_tokens=job.max_new_tokens, top_k=0, seed=0,
                                    stop=list(stop))
        outcomes = generate_in_batches(backend, prompts, sampling,
                                       max(1, settings.batch_size // job.votes),
                                       seed_of=lambda b: 7919 * b + 1,
                                       on_batch=lambda outs: progress(len(outs)))
        records = _voted_records(job, rows, prompts, outcomes, checker)
    else:
        outcomes = generate_in_batches(backend, prompts, greedy(job.max_new_tokens, stop),
                                       settings.batch_size,
                                       on_batch=lambda outs: progress(len(outs)))
    for prompt, row, out in zip(prompts, rows, outcomes if not job.votes else []):
        if isinstance(out, str):  # a request that failed for good
            records.append({"id": row["id"], "prompt": prompt, "output": "", "gold": row["gold"],
                            "pred_answer": NO_ANSWER, "extractor": None, "correct": False,
                            "n_tokens": 0, "finish_reason": f"error: {out}"[:500]})
            continue
        gen = out[0]
        text = gen.text
        if job.first_line:
            text = next((ln for ln in text.splitlines() if ln.strip()), "")
        found = checker.extract(text, row["question"])
        records.append({"id": row["id"], "prompt": prompt, "output": text, "gold": row["gold"],
                        "pred_answer": found.answer, "extractor": found.extractor,
                        "correct": checker.match(found.answer, row["gold"], row["question"]),
                        "n_tokens": int(gen.token_ids.shape[0]),
                        "finish_reason": gen.finish_reason})
    counters = {"n": len(records), "correct": sum(r["correct"] for r in records),
                "tokens": sum(r["n_tokens"] for r in records),
                "seconds": round(time.time() - t0, 1)}
    if job.system in ("teacher", "explain"):  # reasoning modes: answers without any step
        counters["no_steps"] = sum(1 for r in records if count_steps(r["output"]) == 0)
    return ShardOutput({"predictions": pa.Table.from_pylist(records, schema=PREDICTION_SCHEMA)},
                       counters, {f"backend:{job.key}": getattr(backend, "name", ""),
                                  **({f"weights:{job.key}": backend.student_weights}
                                     if getattr(backend, "student_weights", None) else {})})


class Models:
    """The systems' backends, built when a job needs them, one in memory at a time (a
    distilled student serves its predict: and explain: jobs with one load)."""

    def __init__(self, cfg: Config, run: RunFolder):
        self.cfg, self.run = cfg, run
        self.key: str | None = None
        self.backend: Backend | None = None
        self._students: dict = {}

    def get(self, job: Job) -> Backend:
        kind = BACKENDS.get(self.cfg.generate.backend)
        if (kind.student_engine is not None and job.system != "teacher"
                and self._student(job.model).decoder_only):
            return self._engine_student(job, kind)
        key = job.variant if job.system in ("predict", "explain") else job.system
        if key != self.key:  # (a system's greedy and voted jobs share one load)
            self.close()
            self.backend, self.key = self._load(job, kind), key
        return self.backend

    def _student(self, model: str):
        from pipeline.models import resolve_model
        from trainer.students import student_for

        if model not in self._students:
            self._students[model] = student_for(resolve_model(model))
        return self._students[model]

    def _engine_student(self, job: Job, kind) -> Backend:
        """Students of a run whose backend can serve them (vLLM) are scored by that engine
        too: an engine of the student model, serving the base model and each distilled
        student (its LoRA adapter, or the adapter merged into the weights)."""
        key = f"{kind.name}:{job.model}"
        if key != self.key:
            self.close()
            ranks = [(self.run.student(n).manifest() or {}).get("settings", {}).get(
                "train", {}).get("lora_r", 0) for n in self.run.students()]
            self.backend = kind.student_engine(self.cfg, job.model, max(ranks + [8]),
                                               self._merger(job.model))
            log("eval", f"student {job.model} in the {kind.name} engine, "
                f"{getattr(self.backend, 'serves_students', 'adapters through its loader')}")
            self.key = key
        if job.adapter_from is None:
            self.backend.use_adapter(None)
        else:
            self.backend.use_adapter(job.adapter_from.name,
                                     str(job.adapter_from.local.copy_of("adapter")))
        return self.backend

    def _merger(self, model: str):
        """`merge(adapter_dir, out_dir)`: the student `model` with the adapter merged in, saved
        as a model folder (for an engine that serves students merged)."""
        from pipeline.models import resolve_model
        from trainer.lora import save_merged

        def merge(adapter_dir: str, out_dir: str) -> None:
            save_merged(resolve_model(model), adapter_dir, self.cfg.eval.dtype,
                        self._student(model), out_dir)

        return merge

    def _load(self, job: Job, kind) -> Backend:
        from pipeline.models import load_tokenizer, resolve_model
        from stages.backends.hf import HFBackend
        from trainer.lora import load_distilled

        g, e = self.cfg.generate, self.cfg.eval
        if job.system == "teacher":
            log("eval", f"teacher {g.model}: few-shot chain of thought")
            cache = None
            if kind.request_cache:  # the teacher is only reachable through its API
                folder = self.run.stage("eval")
                cache = (folder.local.path(REQUEST_CACHE, f"the {kind.name} backend's request "
                                           "cache") if self.run.is_local
                         else folder.local.scratch(REQUEST_CACHE))
            return kind.teacher_for_eval(self.cfg, cache)
        path = resolve_model(job.model)
        student = self._student(job.model)
        if job.system == "base":
            return HFBackend(job.model, e.dtype, loaded=(student.load(path, e.dtype).eval(),
                                                         load_tokenizer(path)))
        adapter_dir = str(job.adapter_from.local.copy_of("adapter"))
        model = load_distilled(path, adapter_dir, e.dtype, student)
        name = self.run.student(job.variant).name
        return HFBackend(f"{job.model}+{name}", e.dtype,
                         loaded=(model, load_tokenizer(adapter_dir)))

    def close(self) -> None:
        if self.backend is not None and hasattr(self.backend, "close"):
            self.backend.close()
        self.backend = self.key = None


def trained_variants(run: RunFolder, wanted: list[str] | None) -> list[str]:
    """train.name of every finished student in the run ('' = train/), or the `wanted` ones,
    each checked to be there."""
    def finished(name: str) -> bool:
        folder = run.student(name)
        return folder.manifest() is not None and folder.exists("adapter")

    if wanted is None:
        return [n for n in run.students() if finished(n)]
    missing = [n for n in wanted if not finished(n)]
    if missing:
        raise FileNotFoundError(
            f"eval.variants names students that are not trained in {run}: "
            + ", ".join(repr(n) for n in missing) + "; train each with `make train "
            "SET=\"train.name=<name> ...\"` first, or leave eval.variants unset to score every "
            "finished one")
    return list(wanted)


def _rows_digest(rows: pa.Table) -> str:
    h = hashlib.sha256()
    for r in rows.select(["id", "question", "gold"]).to_pylist():
        h.update(f"{r['id']}\x1f{r['question']}\x1f{r['gold']}\x1e".encode())
    return h.hexdigest()[:16]


def folder_name(cfg: Config) -> str:
    """The stage folder of the split `eval.split` scores: `eval` (test), `eval-validation`."""
    return "eval" if cfg.eval.split == "test" else f"eval-{cfg.eval.split}"


def plan(cfg: Config, run: RunFolder, models=None) -> Stage:
    """The eval stage of `run`: one shard per system (and student) to score, on the rows of
    `eval.split` (the held-out test split, or the validation split cut from the training
    questions).

    `models`: a factory for the object that hands each job its backend (default `Models`).
    """
    e, g, t = cfg.eval, cfg.generate, cfg.train
    kind = BACKENDS.get(g.backend, "generate.backend")
    test = load_split(cfg.task, e.split)
    if e.n is not None:
        test = test.slice(0, e.n)
    if test.num_rows == 0 and e.split == "validation":
        raise ValueError("eval.split=validation, but the validation split is empty: set "
                         "task.validation_share (e.g. 0.1) to cut it from the training "
                         "questions, then run generate again (the questions cut out are no "
                         "longer generated for)")
    if test.num_rows == 0:
        raise ValueError("the held-out split is empty; set task.n_test / task.test_path")
    checker = answer_checker(cfg)
    common = {"test": _rows_digest(test), "answer_kind": checker.kind, "dtype": e.dtype,
              **checker.decided_by()}
    wants_student = any(s in ("predict", "explain") for s in e.systems)
    variants = trained_variants(run, e.variants) if wants_student else []
    if wants_student and not variants:
        raise FileNotFoundError(f"no finished train stage in {run}; run `make train` first, "
                                "or set eval.systems=[teacher,base]")
    template = PromptTemplate(g.prompt_template)
    jobs: list[Job] = []
    if "teacher" in e.systems:
        spec = {"model": g.model, "template": template.sha256, "chat": g.chat_template,
                "stop": g.stop, "max_new_tokens": e.max_new_tokens, **kind.eval_spec(cfg)}
        jobs.append(Job("teacher", model=g.model, max_new_tokens=e.max_new_tokens, spec=spec))
        if e.vote_samples and "teacher" in e.vote_systems:
            jobs.append(_voting(jobs[-1], e))
    # the engine that scores the students: transformers, or the backend's own engine (with
    # LoRA) where it can serve them
    scorer = {"scorer": kind.name} if kind.student_engine is not None else {}
    if "base" in e.systems:
        jobs.append(Job("base", model=t.student, max_new_tokens=e.predict_max_new_tokens,
                        first_line=True, spec={"model": t.student, "first_line": True,
                                               "max_new_tokens": e.predict_max_new_tokens,
                                               **scorer}))
    for variant in variants:
        folder = run.student(variant)
        manifest = folder.manifest()
        damaged = folder.problems(manifest.get("files", []))
        if damaged:
            file, why = next(iter(damaged.items()))
            raise DamagedFile(folder.where(file), why, f"The student's adapter cannot be "
                              f"trusted: run `distill train` (train.name={variant or 'unset'}) "
                              "again to rebuild it from its last checkpoint, then eval")
        student = manifest["facts"]["student"]
        for system in ("predict", "explain"):
            if system in e.systems:
                budget = e.predict_max_new_tokens if system == "predict" else e.max_new_tokens
                jobs.append(Job(system, variant, model=student,
                                adapter_from=folder,
                                max_new_tokens=budget, first_line=system == "predict",
                                spec={"adapter": manifest_digest(manifest), "student": student,
                                      "first_line": system == "predict",
                                      "max_new_tokens": budget, **scorer}))
                if system == "explain" and e.vote_samples and "explain" in e.vote_systems:
                    jobs.append(_voting(jobs[-1], e))
    shards = [Shard.of(job.key, test, fingerprint(job.system, {**job.spec, **common}))
              for job in jobs]
    settings = EvalSettings({job.key: job for job in jobs}, template, list(g.stop), e.batch_size,
                        checker)
    return Stage(
        name=folder_name(cfg), fingerprinted=common, shards=shards,
        work=eval_shard, settings=settings, outputs=["predictions"],
        resources=models or (lambda: Models(cfg, run)), facts={"n": test.num_rows},
        finalize=_results, prune=False, output_name=lambda kind, shard: f"{shard}.parquet")


def _voting(job: Job, e) -> Job:
    """The self-consistency twin of a reasoning job: `eval.vote_samples` sampled answers,
    majority vote."""
    return Job(job.system, job.variant, model=job.model, adapter_from=job.adapter_from,
               max_new_tokens=job.max_new_tokens, votes=e.vote_samples,
               temperature=e.vote_temperature,
               spec={**job.spec, "votes": e.vote_samples, "temperature": e.vote_temperature})


def _results(manifest: dict) -> None:
    """One result per system and student, in plan order, from each shard's counters."""
    results = []
    for shard in manifest["shards"]:
        system, _, variant = shard["name"].partition("-")
        c = shard["counters"]
        n = max(c["n"], 1)
        result = {"system": system, "n": c["n"], "accuracy": round(c["correct"] / n, 4),
                  "mean_tokens": round(c["tokens"] / n, 2), "seconds": c["seconds"]}
        if variant:
            result["variant"] = variant
        if "no_steps" in c:
            result["no_step_share"] = round(c["no_steps"] / n, 4)
        if "@" in system:
            result["votes"] = int(system.partition("@")[2])
        results.append(result)
    manifest["results"] = results


def main(cfg: Config, run: RunFolder | str | Path, force: bool = False) -> dict:
    """Score every system, print the table and write `eval/report.json`."""
    run = as_run_folder(run)
    folder = run.stage(folder_name(cfg))
    manifest = run_stage(plan(cfg, run), folder, force)
    report = {"results": manifest["results"], "n": manifest["facts"]["n"],
              "split": cfg.eval.split, "test_digest": manifest["settings"]["test"],
        "task": cfg.section("task"), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    folder.write_json("report.json", report)
    print(report_table(report["results"]))
    for line in no_step_warnings(report["results"]):
        log("eval", line)
    return report


def no_step_warnings(results: list[dict], at_least: float = 0.5) -> list[str]:
    """A line for each distilled student whose `explain:` answers mostly hold no calculation
    step: it answers as its `predict:` mode does, so its rationales (and the loop's samples
    of them) are missing."""
    return [f"{label(r)}: {100 * r['no_step_share']:.0f}% of its answers hold no calculation "
            "step (it answers as predict: does). A small pool trains the rationale little "
            "while the short predict: targets are learnt at once: more kept traces, "
            "train.predict_on=labelled or more train.epochs help (README, \"The student beyond "
            "its teacher\")" for r in results
            if r["system"].startswith("explain") and r.get("no_step_share", 0) >= at_least]
