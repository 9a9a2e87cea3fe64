"""What a run's filter reads: the teacher's traces of every generate round and, in a round of
`distill iterate` (`stages.iterate.stage`), the traces its distilled students sampled (scored by the
teacher where it scores). The filter and the loop's planning both read it from here."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.fingerprints import manifest_digest
from pipeline.registry import BACKENDS
from pipeline.run_folder import RunFolder, StageFolder
from stages.generate.rounds import Part, finished_rounds

STUDENT_ROUND = "student-round-{}"
SCORED_ROUND = "scored-round-{}"


def scoring_on(cfg: Config) -> bool:
    """Whether the teacher scores the student's traces: asked for, and a teacher that can."""
    return cfg.iterate.teacher_scores and BACKENDS.get(cfg.generate.backend).scores


def scored(cfg: Config, run: RunFolder, number: int) -> tuple[bool, str]:
    """(whether the teacher scores the traces of student round `number` of `run`, why not):
    `scoring_on`, and a student that writes the teacher's token ids (the same tokenizer: a
    trace in another vocabulary means nothing to the teacher)."""
    if not scoring_on(cfg):
        return False, ("iterate.teacher_scores=false" if not cfg.iterate.teacher_scores else
                       f"the {cfg.generate.backend} backend cannot score a given trace")
    teacher = ((run.stage("generate").manifest() or {}).get("facts") or {}).get(
        "tokenizer_fingerprint")
    sampled = run.stage(STUDENT_ROUND.format(number)).manifest() or {}
    student = (sampled.get("facts") or {}).get("tokenizer_fingerprint")
    if teacher != student:
        return False, (f"the student's tokenizer ({student}) is not the teacher's ({teacher}): "
                       "its token ids mean nothing to the teacher")
    return True, ""


def student_rounds(cfg: Config, run: RunFolder) -> list[tuple[int, StageFolder, dict]]:
    """(round, folder, manifest) of every student round in `run` that the filter reads: the
    teacher-scored traces when the teacher scores, else the student's own."""
    out = []
    for name in run.stage_names("student-round"):
        number = int(name.rsplit("-", 1)[1])
        folder = run.stage(name)
        if folder.manifest() is None:
            raise FileNotFoundError(f"{folder} is not finished: run `distill iterate` again to "
                                    "finish it (finished work is reused)")
        if scored(cfg, run, number)[0]:
            folder = run.stage(SCORED_ROUND.format(number))
            if folder.manifest() is None:
                raise FileNotFoundError(
                    f"the teacher has not scored the traces of {name} ({folder} is not "
                    "finished): run `distill iterate` again, or set iterate.teacher_scores="
                    "false to train on them without the teacher's top-k")
        out.append((number, folder, folder.manifest()))
    return sorted(out, key=lambda x: x[0])


def add_student_parts(cfg: Config, run: RunFolder, parts: dict[str, list[Part]]) -> dict:
    """Append the student rounds' traces to the first-round shards' parts; returns their
    manifests' digests by folder (for the filter's upstream)."""
    used = {}
    for number, folder, manifest in student_rounds(cfg, run):
        for s in manifest["shards"]:
            if s["name"] in parts:
                parts[s["name"]].append(Part(folder, s["outputs"]["traces"], number, False,
                                             "student"))
        used[folder.name] = manifest_digest(manifest)
    return used


def pool(cfg: Config, run: RunFolder, upstream: dict):
    """(first-round shard -> the parts the filter reads, generate's rounds or None, the
    student rounds' digests by folder): the traces of generate's later rounds
    (`stages.generate.rounds`) when the settings ask for them, and those a distilled student sampled
    in this run folder (`stages.iterate.stage`, a round of `distill iterate`)."""
    generated = run.stage("generate")
    rounds = finished_rounds(cfg, run, upstream) \
        if not upstream.get("facts", {}).get("imported") else None
    parts = rounds.parts if rounds else {s["name"]: [Part(generated, s["outputs"]["traces"], 1,
                                                          False)] for s in upstream["shards"]}
    parts = {name: list(p) for name, p in parts.items()}
    return parts, rounds, add_student_parts(cfg, run, parts)


def pool_parts(cfg: Config, run: RunFolder) -> dict[str, list[Part]]:
    """First-round shard -> every part of the traces the filter of `run` reads."""
    upstream = run.stage("generate").manifest()
    if upstream is None:
        raise FileNotFoundError(f"no finished generate stage in {run.stage('generate')}")
    return pool(cfg, run, upstream)[0]
