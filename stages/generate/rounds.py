"""Generate's rounds: sampling until enough correct traces, then hints (rationalization).

Round 1 is the generate stage as it always was: `generate/`, `n_samples` per question, the same
fingerprint and files. With `generate.max_samples` above `n_samples`, the filter's own checks
(answer, steps, length, duplicates: `stages.checks.keep.decide`) then count each question's kept
traces, and the questions short of `wanted_per_question` get `round_samples` more in round 2
(`generate-round-2/`), and so on, until every question has enough or another round would pass
`max_samples`. With `generate.hint_template`, the questions with a gold answer and still no
kept trace are then asked once more with the answer in the prompt (`generate-hints/`; STaR's
rationalization, Zelikman et al. 2022).

Each round is an ordinary stage (plan, shards, records, manifest last, resume, executors, the
teacher's request cache). Its plan is derived from the checked output of the rounds before it,
so the same settings and traces always give the same rounds: a killed round resumes where it
was, a rerun reuses every finished round, and a raised `max_samples` only adds rounds. A round's
shard holds the questions of the first round's shard of the same name, each with the index of
its first new sample (indices continue across rounds); its requests are seeded by question and
sample index, so a request is the same whatever shard or batch it falls in, and an API
teacher's cache answers any request it has seen. The filter reads a question's traces of every
round together (duplicates and caps across rounds) and marks each trace with its round and
whether it was hinted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.config import Config, ConfigError, fingerprinted
from pipeline.fingerprints import fingerprint
from pipeline.log import log
from pipeline.prompts import PromptTemplate
from pipeline.registry import BACKENDS
from pipeline.run_folder import RunFolder, StageFolder
from pipeline.schema import SCHEMA_VERSION
from pipeline.stage import Shard

ROUND = "generate-round-{}"
HINTS = "generate-hints"
QUESTION_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                             ("gold", pa.string()), ("first", pa.int32())])


def wanted(cfg: Config) -> int:
    """Kept traces a question needs to leave the rounds (and to count as covered `k` times):
    `generate.wanted_per_question`, else the filter's cap, else 1."""
    return cfg.generate.wanted_per_question or cfg.filter.max_per_question or 1


def check(cfg: Config) -> None:
    """The rules between the rounds' settings and the filter's."""
    g, cap = cfg.generate, cfg.filter.max_per_question
    if g.max_samples and cap and wanted(cfg) > cap:
        raise ConfigError([f"generate.wanted_per_question={wanted(cfg)} is above "
                           f"filter.max_per_question={cap}: the rounds would sample for traces "
                           "the filter then drops; lower the one or raise the other"])


def request_seed(seed: int, question_id: str, first: int, hinted: bool) -> int:
    """The seed of one later-round request: from the question and its first sample index."""
    key = f"{seed}:{question_id}:{first}:{'hint' if hinted else 'sample'}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


@dataclass
class Round:
    """One round after the first: which questions, how many samples, which prompt."""

    number: int                # 2, 3, ...; the hinted round comes after the last sampling one
    folder: str                # its stage folder in the run
    hinted: bool
    samples: int               # per question
    temperature: float
    template: str              # the prompt file
    questions: dict[str, list[dict]] = field(default_factory=dict)  # first-round shard -> rows

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.questions.values())

    def shards(self) -> list[Shard]:
        """One shard per first-round shard with questions in this round, under its name; the
        checksum covers the questions and their first sample index."""
        out = []
        for name, rows in sorted(self.questions.items()):
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
            table = pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA)
            out.append(Shard.of(name, table, digest))
        return out

    def describe(self, k: int) -> str:
        if self.hinted:
            return (f"{self.count} questions with a gold answer and no kept trace, asked again "
                    f"with the answer in the prompt ({self.template}), {self.samples} samples "
                    "each")
        first = self.questions[next(iter(self.questions))][0]["first"]
        return (f"round {self.number}: {self.count} questions short of {k} kept traces get "
                f"{self.samples} more samples each (samples {first}-{first + self.samples - 1},"
                f" temperature {self.temperature:g})")


@dataclass
class Part:
    """One round's traces of one first-round shard."""

    folder: StageFolder
    entry: dict
    number: int
    hinted: bool
    sampler: str = "teacher"   # or "student": a distilled student's traces (`distill iterate`)


@dataclass
class Question:
    id: str
    question: str
    gold: str | None
    taken: int = 0             # samples generated so far
    kept: int = 0              # of them, traces the filter keeps


def load_parts(parts: list[Part], columns: list[str] | None = None, then: str = "") -> pa.Table:
    """The traces of every round of one first-round shard as one table (each read checked;
    `then`: what to do about a damaged one), with `round`, `hinted` and `sampler` columns."""
    tables = []
    for part in parts:
        wanted_columns = None if columns is None else (
            lambda schema, c=columns: [x for x in c if x in schema.names])
        table = part.folder.read_checked(part.entry, columns=wanted_columns, then=then)
        table = table.replace_schema_metadata(None)
        n = table.num_rows
        table = table.append_column("round", pa.array([part.number] * n, pa.int16()))
        table = table.append_column("hinted", pa.array([part.hinted] * n, pa.bool_()))
        table = table.append_column("sampler", pa.array([part.sampler] * n, pa.string()))
        tables.append(table)
    if len(tables) == 1:
        return tables[0]
    schema = tables[0].schema
    return pa.concat_tables([t.cast(schema) for t in tables])


def parts_checksum(parts: list[Part]) -> str:
    """A first-round shard's input to the filter: its own sha256 alone (as before rounds),
    or every round's part."""
    if len(parts) == 1:
        return parts[0].entry["sha256"]
    key = "|".join(f"{p.number}:{p.hinted}:{p.entry['sha256']}"
                   + (f":{p.sampler}" if p.sampler != "teacher" else "") for p in parts)
    return hashlib.sha256(key.encode()).hexdigest()


class Rounds:
    """The rounds of a run's generate stage, replayed from its folder: each `next()` derives
    the next round from the traces of those before it (None when there is none, `why` says
    why), `add` records a finished one."""

    def __init__(self, cfg: Config, run: RunFolder, first: dict):
        from stages.checks.answers import answer_checker
        from stages.checks.keep import FilterSettings

        check(cfg)
        self.cfg, self.run, self.k = cfg, run, wanted(cfg)
        folder = run.stage("generate")
        self.parts: dict[str, list[Part]] = {
            s["name"]: [Part(folder, s["outputs"]["traces"], 1, False)] for s in first["shards"]}
        self.done: list[tuple[Round, dict]] = []
        self.why = ""
        self._settings = FilterSettings(cfg.filter, answer_checker(cfg, cfg.filter.extractors))
        self._counted: dict[str, tuple[int, list[Question]]] = {}

    def questions(self) -> dict[str, list[Question]]:
        """First-round shard -> its questions, with their samples so far and kept traces (by
        the filter's own checks, over every round so far)."""
        from stages.checks.keep import DECIDED_ON, decide, kept_per_question

        out = {}
        for name, parts in self.parts.items():
            seen = self._counted.get(name)
            if seen is None or seen[0] != len(parts):
                table = load_parts(parts, DECIDED_ON)
                small, results, by_question = decide(table, self._settings)
                kept = kept_per_question(small, results, by_question)
                seen = (len(parts), [Question(q, small[ids[0]]["question"], small[ids[0]]["gold"],
                                              len(ids), kept[q])
                                     for q, ids in by_question.items()])
                self._counted[name] = seen
            out[name] = seen[1]
        return out

    def coverage(self) -> dict[str, int]:
        qs = [q for rows in self.questions().values() for q in rows]
        return {"questions": len(qs), "covered": sum(q.kept >= 1 for q in qs),
                "covered_wanted": sum(q.kept >= self.k for q in qs),
                "samples": sum(q.taken for q in qs)}

    def next(self) -> Round | None:
        g = self.cfg.generate
        if any(r.hinted for r, _ in self.done):
            return None  # the hinted round is the last; `why` was said before it
        sampled = sum(1 for r, _ in self.done if not r.hinted)
        questions = self.questions()
        short = {name: [q for q in qs if q.kept < self.k] for name, qs in questions.items()}
        n_short = sum(len(qs) for qs in short.values())
        step = g.round_samples or g.n_samples
        if not n_short:
            self.why = f"every question has {self.k} kept trace(s)"
        elif not g.max_samples:
            self.why = (f"{n_short} questions short of {self.k} kept trace(s); adaptive "
                        "sampling is off (generate.max_samples=0)")
        elif sampled < (g.max_samples - g.n_samples) // step:
            number = sampled + 2
            temps = g.round_temperatures
            temperature = temps[min(number - 2, len(temps) - 1)] if temps else g.temperature
            first = g.n_samples + sampled * step
            return Round(number, ROUND.format(number), False, step, temperature,
                         g.prompt_template, self._rows(short, lambda q: first))
        else:
            self.why = (f"generate.max_samples={g.max_samples} reached: {n_short} questions "
                        f"still short of {self.k} kept trace(s)")
        if g.hint_template:
            unseen = {name: [q for q in qs if q.kept == 0 and q.gold is not None]
                      for name, qs in questions.items()}
            if any(unseen.values()):
                return Round(sampled + 2, HINTS, True, g.hint_samples or g.n_samples,
                             g.temperature, g.hint_template,
                             self._rows(unseen, lambda q: q.taken))
            self.why += "; no question with a gold answer is without a kept trace (no hints)"
        return None

    @staticmethod
    def _rows(chosen: dict[str, list[Question]], first) -> dict[str, list[dict]]:
        return {name: [{"id": q.id, "question": q.question, "gold": q.gold, "first": first(q)}
                       for q in qs] for name, qs in chosen.items() if qs}

    def add(self, rnd: Round, manifest: dict) -> None:
        """A finished round: its shards join the parts of their first-round shards."""
        folder = self.run.stage(rnd.folder)
        for s in manifest["shards"]:
            if s["name"] in self.parts:
                self.parts[s["name"]].append(Part(folder, s["outputs"]["traces"], rnd.number,
                                                  rnd.hinted))
        self.done.append((rnd, manifest))

    def summary(self) -> list[dict]:
        """Per round after the first: what it asked and what it made (for the manifests and
        reports)."""
        return [{"round": r.number, "folder": r.folder, "hinted": r.hinted,
                 "questions": m["counters"].get("rows", r.count), "samples": r.samples,
                 "temperature": r.temperature,
                 "traces": m["counters"].get("traces", 0),
                 "tokens": m["counters"].get("tokens", 0)} for r, m in self.done]


def finished(settings: dict, shards: list[Shard], folder: StageFolder) -> dict | None:
    """A round's manifest when it was finished with these settings (its `fingerprinted`) for
    these shards (its files are checked when they are read)."""
    manifest = folder.manifest()
    if manifest is None or manifest.get("fingerprint") != fingerprint(settings):
        return None
    recorded = {s["name"]: s["input_checksum"] for s in manifest.get("shards", [])}
    return manifest if recorded == {s.name: s.checksum for s in shards} else None


def generate_fingerprinted(cfg: Config) -> dict:
    """What decides the traces: the settings that go into the fingerprint, by each setting's
    declared rule; those only some backends read count when the chosen one reads them, with
    the config sections it reads (the vLLM engine's)."""
    kind = BACKENDS.get(cfg.generate.backend, "generate.backend")
    template = PromptTemplate(cfg.generate.prompt_template)
    settings = {"generate": fingerprinted(cfg.generate, kind.reads),
                "template_sha256": template.sha256, "schema_version": SCHEMA_VERSION}
    for section in kind.sections:
        settings[section] = fingerprinted(getattr(cfg, section))
    return settings


def round_fingerprinted(cfg: Config, rnd: Round) -> dict:
    """What decides a later round's traces besides its questions (which its shards' checksums
    cover): the teacher's settings, as for the first round, and the round's sampling and
    prompt. The round's number is not in it: a hinted round that comes one round later after
    `max_samples` was raised asks the same requests."""
    template = PromptTemplate(rnd.template)
    return {**generate_fingerprinted(cfg), "round": {
        "samples": rnd.samples, "temperature": rnd.temperature,
        "template_sha256": template.sha256, "hinted": rnd.hinted}}


def finished_rounds(cfg: Config, run: RunFolder, first: dict) -> Rounds:
    """The rounds the settings ask for, each found finished in the run folder (the filter's
    view); a round that is not is an error that says to run generate. A round finished with
    the same sampling for other questions (the filter's settings changed since, so other
    questions count as short) is read as it is, and the log says so: changing a filter
    setting never needs the teacher."""
    rounds = Rounds(cfg, run, first)
    while (rnd := rounds.next()) is not None:
        folder = run.stage(rnd.folder)
        settings = round_fingerprinted(cfg, rnd)
        manifest = finished(settings, rnd.shards(), folder)
        if manifest is None:
            manifest = folder.manifest()
            if manifest is None or manifest.get("fingerprint") != fingerprint(settings):
                raise FileNotFoundError(
                    f"generate has not finished its rounds: {rnd.describe(rounds.k)} is not "
                    f"done in {folder}. Run `distill generate` (`make generate`) to finish "
                    "them (finished rounds are reused), then the filter")
            log("filter", f"{rnd.folder} was made for the questions other settings found "
                f"short ({manifest['counters'].get('rows', 0)} questions; these find "
                f"{rnd.count}): its traces are read as they are. `distill generate` samples "
                "for the questions these settings find short (the teacher's request cache "
                "answers any request it has seen)")
        rounds.add(rnd, manifest)
    if rounds.done:
        log("filter", f"reading {len(rounds.done) + 1} generate rounds ({rounds.why})")
    return rounds
