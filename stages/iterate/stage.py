"""The student as the next sampler (`distill iterate`): its rounds' stages.

Round 1 of the loop is the run itself (generate with its rounds, filter, train, eval). Round r
> 1 lives in its own run folder inside the run, `<run>/iterate/round-<r>/`, which holds:

- copies of the run's generate folders (the teacher's traces, every generate round) and of
  the student rounds before r, each made in its own round's folder (a copy is replaced when
  its source was remade);
- `student-round-<r>/`: the previous round's distilled student (its `train/` adapter) samples
  `iterate.samples[r - 2]` `explain:` rationales for every training question still short of
  `wanted_per_question` kept traces (and `iterate.covered_share` of the others), an ordinary
  stage whose shards align with the first round's and whose requests are seeded by question
  and sample index (indices continue after every earlier sample of the question). The
  student's own log-probabilities are not kept: each position's top-k row is empty (no id);
- `scored-round-<r>/`: with `iterate.teacher_scores`, the teacher's forward pass over each
  student trace gives its top-k at every position (`Backend.score`), stored like a generated
  trace's, so top-k KD learns the teacher's distribution on the student's own outputs (the
  data of on-policy distillation, offline). API teachers cannot score: the rows stay empty and
  KD skips them;
- filter, train and eval as in any run: the filter reads the teacher's rounds and every
  student round together (one decision per question: duplicates and the cap across all of
  them; `sampler` says who made a kept trace), and the student of round r trains from the base
  model on that pool (ReST-EM, Singh et al. 2023).

Every piece is a stage with its fingerprint, so a rerun reuses finished rounds, a killed round
resumes, and a setting of round r (`iterate.temperatures[r - 2]`) leaves the rounds before it
alone, as do `iterate.samples[r - 2]` and `iterate.rounds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
from pipeline.config import Config
from pipeline.fingerprints import manifest_digest
from pipeline.log import log
from pipeline.registry import BACKENDS
from pipeline.run_folder import RunFolder
from pipeline.schema import SCHEMA_VERSION, logical, traces_table
from pipeline.stage import Progress, Shard, ShardOutput, Stage, no_progress
from pipeline.tasks import hash_unit
from stages.backends.base import Generation
from stages.filter.pool import SCORED_ROUND, STUDENT_ROUND, pool_parts
from stages.generate.rounds import Round, wanted



def round_run(run: RunFolder, number: int) -> RunFolder:
    """The run folder of loop round `number` (1: the run itself)."""
    if number == 1:
        return run
    return RunFolder(f"{str(run.url).rstrip('/')}/iterate/round-{number}")  # (a URL stays one)


class StudentPrompt:
    """The student's `explain:` prompt in the place of a teacher's prompt template."""

    hinted = False
    path = "explain:"
    sha256 = hashlib.sha256(b"student explain: task prompt v1").hexdigest()

    def render(self, question: str, answer: str | None = None) -> str:
        from trainer.examples import EXPLAIN, task_prompt

        return task_prompt(EXPLAIN, question)


# ---------------------------------------------------------------- planning a round

def teacher_folders(run: RunFolder) -> list[str]:
    """The stage folders of the teacher's traces in `run`: generate and its later rounds."""
    return ["generate", *run.stage_names("generate-round"), *run.stage_names("generate-hints")]


def copy_finished(source: RunFolder, target: RunFolder, name: str) -> None:
    """A copy of `source`'s finished stage folder `name` in `target`, made or replaced when
    the copy there is not that stage (its manifest differs; the source is never touched)."""
    made = source.stage(name).manifest()
    if made is None or target.stage(name).manifest() == made:
        return
    if target.fs.exists(target.path(name)):
        target.fs.rm(target.path(name), recursive=True)  # a stale copy; the source stays
    target.fs.makedirs(target.root, exist_ok=True)
    target.fs.copy(source.path(name), target.path(name), recursive=True)


def copy_pool(run: RunFolder, number: int) -> RunFolder:
    """Round `number`'s run folder with copies of the teacher's generate folders and of the
    student rounds before it (a copy whose source was remade since is replaced)."""
    target = round_run(run, number)
    sources = [(run, n) for n in teacher_folders(run)]
    for q in range(2, number):
        sources += [(round_run(run, q), STUDENT_ROUND.format(q)),
                    (round_run(run, q), SCORED_ROUND.format(q))]
    for source, name in sources:
        copy_finished(source, target, name)
    return target


def plan_round(cfg: Config, run: RunFolder, number: int) -> Round:
    """What the student of round `number - 1` samples in round `number`: the questions the
    round before's filter left short of `wanted_per_question` kept traces (and
    `iterate.covered_share` of the others), each from its next sample index."""

    it, k = cfg.iterate, wanted(cfg)
    prev = round_run(run, number - 1)
    kept_folder = prev.stage("filter")
    manifest = kept_folder.manifest()
    if manifest is None:
        raise FileNotFoundError(f"round {number - 1} has no finished filter ({kept_folder})")
    kept = kept_folder.read_tables([s["outputs"]["kept"] for s in manifest["shards"]],
                                   columns=["id"], then="Run `distill iterate` again to "
                                   "remake it").column("id").to_pylist()
    n_kept: dict[str, int] = {}
    for q in kept:
        n_kept[q] = n_kept.get(q, 0) + 1
    questions: dict[str, list[dict]] = {}
    for name, parts in pool_parts(cfg, prev).items():
        taken: dict[str, int] = {}
        first_seen: dict[str, dict] = {}
        for part in parts:
            table = part.folder.read_checked(part.entry, columns=["id", "sample", "question",
                                                                  "gold"])
            for row in table.to_pylist():
                taken[row["id"]] = max(taken.get(row["id"], 0), row["sample"] + 1)
                first_seen.setdefault(row["id"], row)
        chosen = [q for q in first_seen if n_kept.get(q, 0) < k
                  or hash_unit(f"{q}\x1f{number}") < it.covered_share]
        if chosen:
            questions[name] = [{"id": q, "question": first_seen[q]["question"],
                                "gold": first_seen[q]["gold"], "first": taken[q]}
                               for q in chosen]
    temps, samples = it.temperatures, it.samples
    return Round(number, STUDENT_ROUND.format(number), False,
                 samples[min(number - 2, len(samples) - 1)],
                 temps[min(number - 2, len(temps) - 1)], StudentPrompt.path, questions)


# ---------------------------------------------------------------- the student samples

class _EmptyTopK:
    """A sampler whose log-probabilities are not kept: it generates without them and gives
    each position a top-k row of `k` empty entries (no id, -inf), the shard layout of a
    teacher's trace that KD skips position by position."""

    def __init__(self, backend, k: int, close):
        self._backend, self._k, self._close = backend, k, close

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def generate(self, prompts, settings):
        out = self._backend.generate(prompts, dataclasses.replace(settings, top_k=0))
        for row in out:
            for g in row if isinstance(row, list) else []:
                n = g.token_ids.shape[0]
                g.token_logprobs = np.zeros(n, np.float32)
                g.topk_ids = np.full((n, self._k), -1, np.int32)
                g.topk_logprobs = np.full((n, self._k), -np.inf, np.float32)
        return out

    def close(self) -> None:
        self._close()


def student_sampler(cfg: Config, prev: RunFolder, k: int):
    """A factory of the distilled student of `prev` (its `train.name` folder) as a sampler:
    in the teacher backend's engine with the LoRA adapter where that engine serves students
    (vLLM), else transformers with the adapter merged (what eval uses)."""
    def build():
        from stages.eval.stage import Job, Models

        folder = prev.student(cfg.train.name)
        manifest = folder.manifest()
        models = Models(cfg, prev)
        job = Job("explain", cfg.train.name, model=manifest["facts"]["student"],
                  adapter_from=folder)
        log("iterate", f"sampler: the student of {prev} ({folder.name}/adapter)")
        return _EmptyTopK(models.get(job), k, models.close)

    return build


def sample_stage(cfg: Config, prev: RunFolder, rnd: Round) -> Stage:
    """Round `rnd.number`'s student sampling (a stage of the round's folder) by the student
    of `prev`, the round before's folder."""
    from stages.generate.stage import GenerateSettings, generate_shard

    it, g = cfg.iterate, cfg.generate
    folder = prev.student(cfg.train.name)
    trained = folder.manifest()
    if trained is None:
        raise FileNotFoundError(f"round {rnd.number - 1} has no trained student ({folder})")
    budget = it.max_new_tokens or cfg.eval.max_new_tokens
    sampling = {"n": rnd.samples, "temperature": rnd.temperature, "top_p": g.top_p,
                "max_new_tokens": budget, "seed": g.seed, "stop": list(g.stop)}
    settings = {"student": {"adapter": manifest_digest(trained),
                            "model": trained["facts"]["student"], "dtype": cfg.eval.dtype,
                            "engine": g.backend if BACKENDS.get(g.backend).student_engine
                            else "hf"},
                "sampling": sampling, "prompt": StudentPrompt.sha256, "top_k": g.top_k,
                "schema_version": SCHEMA_VERSION}
    sampler_cfg = dataclasses.replace(g, max_new_tokens=budget, batch_size=it.batch_size)
    return Stage(
        name=rnd.folder, fingerprinted=settings, shards=rnd.shards(), work=generate_shard,
        settings=GenerateSettings(sampler_cfg, StudentPrompt(), rnd.samples, rnd.temperature,
                                  later_round=True),
        outputs=["traces"], resources=student_sampler(cfg, prev, g.top_k),
        facts={"k": g.top_k, "schema_version": SCHEMA_VERSION, "sampler": "student",
               "round": rnd.number, "template": StudentPrompt.path, "sampling": sampling,
               "usable_for_kd": False, "kd_unusable_because": "a student's own traces: "
               "their top-k rows are empty until the teacher scores them"},
        upstream={"student": manifest_digest(trained)}, rates=("tokens",))


# ---------------------------------------------------------------- the teacher scores

@dataclass
class ScoreSettings:
    template: object        # the teacher's prompt template
    k: int
    shard_format: int
    batch_size: int


def score_shard(settings: ScoreSettings, shard: Shard, teacher,
                progress: Progress = no_progress) -> ShardOutput:
    """The student's traces of one shard with the teacher's log-probabilities: for every
    trace, the teacher's prompt for its question followed by the trace's tokens, one forward
    pass; the token's own log-probability and the teacher's top k at every position."""
    table = logical(shard.load())
    scalar = ["id", "sample", "question", "gold", "prompt", "completion", "finish_reason",
              "error"]
    records = table.select(scalar).to_pylist()
    token_ids = table.column("token_ids").to_pylist()
    todo = [i for i, r in enumerate(records) if r["error"] is None and token_ids[i]]
    gens: list[Generation | None] = [None if r["error"] is not None else Generation(
        r["completion"], r["finish_reason"], np.zeros(0, np.int32), np.zeros(0, np.float32),
        np.zeros((0, settings.k), np.int32), np.zeros((0, settings.k), np.float32))
        for r in records]
    step = max(1, settings.batch_size)
    tokens = 0
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        scored = teacher.score([settings.template.render(records[i]["question"]) for i in chunk],
                               [np.asarray(token_ids[i], np.int32) for i in chunk], settings.k,
                               step)
        done = 0
        for i, s in zip(chunk, scored):
            r = records[i]
            gens[i] = Generation(r["completion"], r["finish_reason"],
                                 np.asarray(token_ids[i], np.int32), s.token_logprobs, s.topk_ids,
                                 s.topk_logprobs)
            done += len(token_ids[i])
        tokens += done
        progress(len(chunk), tokens=done)
    out = traces_table(records, gens, settings.k, settings.shard_format)
    return ShardOutput({"traces": out}, {"traces": len(todo), "scored_tokens": tokens},
                       teacher.facts())


def score_stage(cfg: Config, run: RunFolder, number: int) -> Stage:
    """The teacher's scoring of round `number`'s student traces, a stage of `run`."""
    from pipeline.prompts import PromptTemplate
    from stages.generate.stage import teacher_factory
    from stages.generate.rounds import generate_fingerprinted

    g = cfg.generate
    sampled = run.stage(STUDENT_ROUND.format(number))
    manifest = sampled.manifest()
    shards = [Shard(s["name"], s["outputs"]["traces"]["sha256"], s["outputs"]["traces"]["rows"],
                    lambda e=s["outputs"]["traces"]: sampled.read_checked(
                        e, then="Run `distill iterate` again to remake it"))
              for s in manifest["shards"]]
    template = PromptTemplate(g.prompt_template)
    return Stage(
        name=SCORED_ROUND.format(number),
        fingerprinted={**generate_fingerprinted(cfg), "scored": "teacher forward pass"},
        shards=shards, work=score_shard,
        settings=ScoreSettings(template, g.top_k, g.shard_format, cfg.iterate.batch_size),
        outputs=["traces"], resources=teacher_factory(cfg, run.stage("generate")),
        facts={"k": g.top_k, "schema_version": SCHEMA_VERSION, "sampler": "student",
               "scored_by": g.model, "template": g.prompt_template, "round": number,
               "usable_for_kd": True},
        upstream={"sampled": manifest_digest(manifest)}, rates=("tokens",))


def coverage_row(number: int, run: RunFolder, results: list[dict], sampled: int) -> dict:
    """One line of the loop's table: what the round's filter kept and its student's scores."""
    counters = run.stage("filter").manifest()["counters"]
    acc = {r["system"]: r["accuracy"] for r in results if not r.get("variant")}
    votes = next((r for r in results if r["system"].startswith("explain@")
                  and not r.get("variant")), None)
    kept, by_student = counters.get("kept", 0), counters.get("student_kept", 0)
    return {"round": number, "sampled_questions": sampled,
            "questions": counters.get("questions"), "covered": counters.get("covered"),
            "covered_wanted": counters.get("covered_wanted"), "kept": kept,
            "teacher_kept": kept - by_student, "student_kept": by_student,
            "teacher_tokens": counters.get("teacher_tokens", 0),
            "student_tokens": counters.get("student_tokens", 0),
            "predict": acc.get("predict"), "explain": acc.get("explain"),
            "explain_votes": votes["accuracy"] if votes else None,
            "votes": votes.get("votes") if votes else None,
            "explain_tokens": next((r["mean_tokens"] for r in results
                                    if r["system"] == "explain" and not r.get("variant")), None),
            "explain_no_steps": next((r.get("no_step_share") for r in results
                                      if r["system"] == "explain" and not r.get("variant")),
                                     None),
            "votes_tokens": votes["mean_tokens"] if votes else None}
