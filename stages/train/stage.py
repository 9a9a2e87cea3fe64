"""Stage 3, train: Distilling Step-by-Step on the kept traces, with LoRA.

Reads the filter stage's kept shards; writes `train/adapter/` (LoRA weights and tokenizer),
`train/log.jsonl` and checkpoints under `train/checkpoints/` (a stopped run resumes from the
last one). A named variant (`train.name=kd`) writes the same into `train-kd/` instead, so
students trained with other settings or seeds on the same traces sit side by side. The loss is
the sum of the loss terms the settings switch on (`trainer.losses`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import Config, ConfigError, fingerprinted
from trainer.settings import TrainConfig
from pipeline.fingerprints import manifest_digest
from pipeline.log import log
from pipeline.run_folder import RunFolder, StageFolder, as_run_folder
from pipeline.schema import logical, topk_columns
from pipeline.stage import Progress, Shard, ShardOutput, Stage, no_progress
from pipeline.tasks import hash_unit
from stages.checks.answers import answer_checker
from trainer.lora import lora_targets
from trainer.students.base import Student

def uses_topk(t: TrainConfig) -> list[str]:
    """The settings (as `train.key=value`) whose loss terms need the teacher's stored top-k."""
    from trainer.losses import terms_from_settings

    return [f"train.{term.switch}={getattr(t, term.switch)}" for term in terms_from_settings(t)
            if "topk" in term.needs]


def _switched_off(t: TrainConfig, switches: list[str]) -> TrainConfig:
    """`t` with each of `switches` at its default (the loss term it turns on is off)."""
    fields = {f.name: f for f in dataclasses.fields(t)}
    return dataclasses.replace(t, **{s: fields[s].default for s in switches})


def kept_rows(kept, upstream: dict, token_targets: bool, with_topk: bool) -> list[dict]:
    """The kept traces as rows (`kept_table`)."""
    return kept_table(kept, upstream, token_targets, with_topk).to_pylist()


def kept_table(kept, upstream: dict, token_targets: bool, with_topk: bool):
    """The kept traces the examples are built from, each shard checked as it is read; with
    `with_topk`, the teacher's top-k as float32 `topk_ids` / `topk_logprobs` whatever format
    the shard stores them in."""
    columns = ["id", "question", "gold", "pred_answer", "rationale"]
    if token_targets:
        columns += ["completion", "token_ids"]

    def wanted(schema):  # the top-k columns of the shard's own format (1 or 2); `hinted`
        have = columns + (["hinted"] if "hinted" in schema.names else [])  # since rounds
        return have + [c for c in topk_columns(schema) if c not in have] if with_topk \
            else have

    def float32_topk(table):  # only what the examples use: no Python objects for the rest
        return logical(table).select([c for c in columns + ["hinted"] if c in table.schema.names]
                                     + ["topk_ids", "topk_logprobs"])

    return kept.read_tables([s["outputs"]["kept"] for s in upstream["shards"]],
                            columns=wanted, each=float32_topk if with_topk else None,
                            then="Run `distill filter` (`make filter`) to remake it, then "
                            "train again")


def train_fingerprinted(cfg: Config, upstream: dict, student: Student) -> dict:
    """What decides the adapter: the train settings by each one's declared rule (the knobs of
    a loss term that is off, the name and where the metrics go never count), the LoRA targets
    as the student's kind resolves them, and the filter's output."""
    section = fingerprinted(cfg.train)
    section["lora_targets"] = lora_targets(cfg.train, student)
    return {"train": section, "filter_digest": manifest_digest(upstream)}


def target_plan(cfg: Config, facts: dict, tokenizer) -> tuple[bool, float]:
    """(explain targets are the teacher's own tokens?, KD weight actually used).

    Token targets need the student to share the teacher's tokenizer and token ids that spell
    the text (`usable_for_kd`); KD needs both and stored top-k rows. Asking for either when the
    tokenizers differ is an error naming both; `auto` and KD fall back to text-only training,
    said in the log, when the ids or the log-probabilities are not usable. `facts` are the
    generate stage's (its manifest's `facts`).
    """
    from pipeline.models import tokenizer_fingerprint

    t = cfg.train
    mine = tokenizer_fingerprint(tokenizer)
    teacher_vocab, student_vocab = facts.get("vocab_size"), len(tokenizer)
    same = facts.get("tokenizer_fingerprint") == mine and (
        teacher_vocab is None or teacher_vocab >= student_vocab)
    usable = facts.get("usable_for_kd", True)
    topk = uses_topk(t)
    wants = f"the teacher's top-k ({', '.join(topk)})" if topk else (
        "train.explain_targets=tokens" if t.explain_targets == "tokens" else None)
    if wants and not same:
        raise ValueError(
            f"{wants} needs the student to share the teacher's tokenizer: the traces come from "
            f"{facts.get('teacher')} (tokenizer {facts.get('tokenizer_fingerprint')}, "
            f"vocabulary {teacher_vocab}) and the student {t.student} has tokenizer {mine} "
            f"(vocabulary {student_vocab}). Use a student of the teacher's family, or set "
            "train.kd_lam=0 and train.explain_targets=auto to train on the text only")
    if t.explain_targets == "text" or not same:
        return False, 0.0
    if not usable:
        why = facts.get("kd_unusable_because", "see generate/manifest.json")
        if t.explain_targets == "tokens":
            raise ValueError(f"train.explain_targets=tokens, but the teacher's token ids do not "
                             f"match its text ({why}); use train.explain_targets=auto")
        if t.kd_lam > 0:
            log("train", "train.kd_lam > 0 but the teacher's log-probabilities are not usable "
                f"for KD ({why}): training on the text only")
        return False, 0.0
    if t.kd_lam > 0 and not facts.get("k"):
        log("train", "train.kd_lam > 0 but the traces hold no top-k log-probabilities "
            "(generate.top_k): training on the teacher's tokens without KD")
        return True, 0.0
    return True, t.kd_lam


def loss_settings(cfg: Config, facts: dict, tokenizer) -> tuple[bool, TrainConfig]:
    """(explain targets are the teacher's tokens?, the train settings the loss is made of):
    `target_plan`, with every piece that needs the teacher's top-k turned off where the
    traces cannot give it (said in the log). Traces brought in by `distill import` hold no
    top-k at all: asking for a piece that needs it is an error."""
    t = cfg.train
    if facts.get("imported") and uses_topk(t):
        raise ValueError(
            f"{', '.join(uses_topk(t))} needs the teacher's top-k log-probabilities, and the "
            f"traces of this run were imported ({facts['imported']}), which carry none. Set "
            "train.kd_lam=0, train.answer_kd_lam=0 and train.rationale_loss=ce, or generate "
            "the traces with a teacher (`distill generate`) to distil its log-probabilities")
    token_targets, kd_lam = target_plan(cfg, facts, tokenizer)
    used = dataclasses.replace(t, kd_lam=kd_lam)
    topk_ok = token_targets and bool(facts.get("k")) and facts.get("usable_for_kd", True)
    from trainer.losses import terms_from_settings

    needing = [term.switch for term in terms_from_settings(used) if "topk" in term.needs]
    if not topk_ok and needing:
        log("train", "the traces give no usable top-k log-probabilities (see the lines above): "
            + ", ".join(f"train.{s}" for s in needing) + " off; what they replace is learnt "
            "by cross-entropy")
        used = _switched_off(used, needing)
    return token_targets, used


def _predict_text(template: str, canonical: Callable[[str], str]) -> Callable[[str], str]:
    """The predict: target of a gold answer: its canonical form in `train.predict_template`
    (one pass, so an answer holding `{answer}` stays as it is)."""
    if template == "{answer}":
        return canonical
    return lambda gold: template.replace("{answer}", canonical(gold))


def keep_share(rows: list[dict], share: float) -> list[dict]:
    """The rows of a `share` of the questions, chosen by a hash of their id: the same for
    every seed, and a smaller share is a subset of a larger one."""
    if share >= 1:
        return rows
    return [r for r in rows if hash_unit(r["id"]) < share]


def hold_out(rows: list[dict], share: float) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the questions whose hash falls in the last `share`
    are held out, so a `keep_share` of the rest never takes one of them."""
    if share <= 0:
        return rows, []
    return ([r for r in rows if hash_unit(r["id"]) < 1 - share],
            [r for r in rows if hash_unit(r["id"]) >= 1 - share])


@dataclass
class TrainSettings:
    """What `train_shard` needs besides the kept traces: the settings, the student, the loss
    the traces allow, and the student's folder (its checkpoints, log and TensorBoard files go
    through it)."""

    cfg: TrainConfig
    student_path: str
    student: Student
    tokenizer: object
    token_targets: bool
    used: TrainConfig          # the train settings with what the traces cannot give turned off
    terms: list
    folder: StageFolder
    # train.predict_on=labelled: the training questions with a gold answer (id, question, gold)
    labelled: Callable[[], list[dict]] | None = None
    # the gold answer as the predict: target writes it (the answer kind's canonical form)
    answer_text: Callable[[str], str] = str


def labelled_questions(run: RunFolder) -> list[dict]:
    """Every training question with a gold answer, once each, from the first generate round's
    shards (each read checked): what `train.predict_on=labelled` makes `predict:` examples of."""
    generated = run.stage("generate")
    manifest = generated.manifest()
    if manifest is None:
        raise FileNotFoundError(f"train.predict_on=labelled reads the training questions from "
                                f"{generated}, which has no finished stage; run `make generate`")
    table = generated.read_tables([s["outputs"]["traces"] for s in manifest["shards"]],
                                  columns=["id", "question", "gold"],
                                  then="Run `distill generate` to remake it")
    seen, out = set(), []
    for row in table.to_pylist():
        if row["gold"] is not None and row["id"] not in seen:
            seen.add(row["id"])
            out.append(row)
    return out


def plan(cfg: Config, run: RunFolder) -> Stage:
    """The train stage of a student (`train.name`): one shard, the filter's kept traces, whose
    output is the `adapter/` folder; the same protocol as the shard stages (lock, plan,
    record, manifest last), so resume, the lock and set-aside work as they do there."""
    from pipeline.models import load_tokenizer, resolve_model
    from trainer.arguments import check_args
    from trainer.losses import terms_from_settings
    from trainer.students import student_for

    t = cfg.train
    problems = check_args(t.args)
    if problems:  # the settings first: a typo is said before any input is read
        raise ConfigError(problems)
    kept = run.stage("filter")
    upstream = kept.manifest()
    if upstream is None:
        raise FileNotFoundError(f"no finished filter stage in {kept}; run `make filter` "
                                "for this run first")
    folder = run.student(t.name)
    student_path = resolve_model(t.student)
    student = student_for(student_path)
    settings = train_fingerprinted(cfg, upstream, student)
    tokenizer = load_tokenizer(student_path, padding_side="right")
    generate_facts = (run.stage("generate").manifest() or {}).get("facts", {})
    token_targets, used = loss_settings(cfg, generate_facts, tokenizer)
    terms = terms_from_settings(used)
    with_topk = any("topk" in term.needs for term in terms)
    digest = manifest_digest(upstream)
    traces = Shard("adapter", digest, int(upstream["counters"].get("kept", 0)),
                   lambda: kept_table(kept, upstream, token_targets, with_topk))
    return Stage(
        name=folder.name, fingerprinted=settings, shards=[traces], work=train_shard,
        settings=TrainSettings(t, student_path, student, tokenizer, token_targets, used, terms,
                               folder, (lambda: labelled_questions(run))
                               if t.predict_on == "labelled" else None,
                               _predict_text(t.predict_template,
                                             answer_checker(cfg).canonical)),
        outputs=[], folders=("adapter",), facts={"student": t.student, "name": t.name},
        upstream={"filter": upstream["fingerprint"], "digest": digest}, prune=False,
        unit="trace")


def main(cfg: Config, run: RunFolder | str | Path, force: bool = False) -> dict | None:
    """Train the student; under `torchrun` / `accelerate launch` every process trains and the
    main one writes (the others return None)."""
    from pipeline.executors import run_stage
    from pipeline.executors.local import LocalExecutor
    from pipeline.executors.peer import PeerExecutor

    run = as_run_folder(run)
    stage = plan(cfg, run)
    folder = stage.settings.folder
    # A student trained before train used the stages' protocol has no shard record: its
    # manifest, when it is this one's and its files are intact, still means it is done.
    manifest = folder.manifest()
    if (not force and manifest is not None and "shards" not in manifest
            and manifest.get("fingerprint") == stage.fingerprint and folder.intact(manifest)):
        log(folder.name, f"up to date (fingerprint {stage.fingerprint}): nothing to do")
        return manifest
    # Every process of a multi-process run trains; the main one alone holds the lock (taken
    # before the student is loaded) and writes.
    main_process = int(os.environ.get("RANK", "0")) == 0
    return run_stage(stage, folder, force, LocalExecutor() if main_process else PeerExecutor())


def train_shard(settings: TrainSettings, traces: Shard, resources=None,
                progress: Progress = no_progress) -> ShardOutput:
    """Train the student on the kept traces (from its last complete checkpoint, if any) and
    save its adapter into a folder of this machine, which the executor publishes."""
    import torch

    from pipeline.models import model_revision, tokenizer_fingerprint
    from trainer.lora import lora_student

    t, used, name = settings.cfg, settings.used, settings.folder.name
    student, tokenizer, terms = settings.student, settings.tokenizer, settings.terms
    rows, heldout = _training_rows(t, traces.load().to_pylist(), name)
    examples, heldout_examples = _examples(settings, rows, heldout)

    torch.manual_seed(t.seed)
    model = lora_student(settings.student_path, t, student)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log(name, f"LoRA r={t.lora_r}: {n_trainable:,} trainable of {n_total:,} parameters")
    steps, train_loss, built = _train(settings, model, examples, heldout_examples)
    progress(traces.rows)
    return ShardOutput(
        {}, {"traces": len(rows), "steps": steps, "train_loss": round(train_loss, 4)},
        {"student_revision": model_revision(settings.student_path),
         "student_kind": student.name,
         "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
         "trainable_parameters": n_trainable, "kd_lam_used": used.kd_lam,
         "explain_targets": "tokens" if settings.token_targets else "text",
         "loss_terms": {term.name: term.weight for term in terms}},
        folders={"adapter": built} if built is not None else {})


def _training_rows(t: TrainConfig, rows: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    """(the kept traces trained on, those held out for the held-out loss), after
    `train.heldout_share` and `train.data_fraction`, with a clear error where none is left."""
    rows, heldout = hold_out(rows, t.heldout_share)
    n_kept = len(rows)
    rows = keep_share(rows, t.data_fraction)
    if t.heldout_share > 0:
        log(name, f"train.heldout_share={t.heldout_share:g}: {len(heldout)} kept traces "
            "held out for the held-out loss (eval_loss)")
        if not heldout:
            raise ValueError(f"train.heldout_share={t.heldout_share:g} holds out none of the "
                             f"{n_kept} kept traces; raise it or set it to 0")
    if t.data_fraction < 1:
        log(name, f"train.data_fraction={t.data_fraction:g}: {len(rows)} of {n_kept} "
            "kept traces")
    if not rows and n_kept:
        raise ValueError(f"train.data_fraction={t.data_fraction:g} leaves none of the {n_kept} "
                         "kept traces; raise it")
    if not rows:
        raise ValueError("the filter kept no traces, so there is nothing to train on; see "
                         "the filter's funnel.json for why they were dropped, and loosen "
                         "the filter or generate more (task.n_train, generate.n_samples)")
    return rows, heldout


def _examples(settings: TrainSettings, rows: list[dict],
              heldout: list[dict]) -> tuple[list[dict], list[dict]]:
    """The training records (a `predict:` and an `explain:` example each) and the held-out
    ones, with what they hold said in the log."""
    from trainer.examples import build_examples, pair_cycled, predict_example

    t, used, name = settings.cfg, settings.used, settings.folder.name
    student, tokenizer, terms = settings.student, settings.tokenizer, settings.terms
    topk_parts = {term.part for term in terms if "topk" in term.needs}

    def examples_of(part: list[dict]) -> list[dict]:
        return build_examples(part, tokenizer, student, t.max_length,
                              teacher_tokens=settings.token_targets,
                              with_topk="explain" in topk_parts,
                              answer_tokens=used.answer_kd_lam > 0, topk_hinted=t.kd_hinted,
                              answer_text=settings.answer_text)

    examples = examples_of(rows)
    n_predict = len(examples)
    if settings.labelled is not None:  # predict: on every labelled question
        labelled, _ = hold_out(settings.labelled(), t.heldout_share)
        labelled = keep_share(labelled, t.data_fraction)
        predicts = [predict_example(r, tokenizer, student, t.max_length, settings.answer_text)
                    for r in labelled]
        examples = pair_cycled(predicts, [e["explain"] for e in examples])
        n_predict = len(predicts)
        log(name, f"train.predict_on=labelled: predict: examples from {len(predicts)} labelled "
            f"questions ({len({r['id'] for r in rows})} of them with a kept trace), explain: "
            f"from {len(rows)} kept traces; {len(examples)} records (the shorter list cycled)")
    hinted = sum(1 for r in rows if r.get("hinted"))
    if hinted:
        log(name, f"{hinted} of the kept traces are hinted (their prompt held the answer): "
            "explain: targets like the others" + (
                "" if t.kd_hinted or not topk_parts else
                ", no KD from their top-k (train.kd_hinted=false)"))
    if used.answer_kd_lam > 0:
        _log_answer_kd(name, examples)
    log(name, ("explain targets: the teacher's own rationale tokens" + (
        f"; KD on them: lam={used.kd_lam}, T={t.kd_temperature}, beta={t.kd_beta}, "
        f"tail={t.kd_tail}" if used.kd_lam > 0 else "")) if settings.token_targets else
        "explain targets: the rationale text, tokenised by the student")
    log(name, f"{len(rows)} kept traces -> {n_predict} predict + {len(rows)} explain "
        f"examples; student {t.student}; loss terms: "
        + ", ".join(f"{term.name} x {term.weight:g}" for term in terms))
    return examples, examples_of(heldout) if heldout else []


def _log_answer_kd(name: str, examples: list[dict]) -> None:
    """How many traces give answer KD its targets, and how sure the teacher was there."""
    import math

    top1 = [math.exp(lps[0]) for ex in examples
            for ids, lps in zip(ex["predict"]["topk_ids"], ex["predict"]["topk_logprobs"])
            if ids and ids[0] >= 0]
    found = sum(any(ids and ids[0] >= 0 for ids in ex["predict"]["topk_ids"])
                for ex in examples)
    log(name, f"answer KD: {found} of {len(examples)} traces write their answer as is "
        f"(their targets are the teacher's answer tokens); the teacher's top-1 "
        f"probability there is {sum(top1) / max(1, len(top1)):.3f} on average")


def _train(settings: TrainSettings, model, examples: list[dict],
           heldout_examples: list[dict]) -> tuple[int, float, Path | None]:
    """Train (from the last complete checkpoint), then save the adapter: (steps, training
    loss, the adapter's folder on this machine; None in a process that does not write)."""
    import torch
    from datasets import Dataset

    from pipeline.sealed import last_complete_checkpoint
    from trainer.arguments import sft_config, tensorboard_dir
    from trainer.dss import DSSTrainer, JsonlLogCallback, OnSave, SealCheckpoints
    from trainer.examples import DSSCollator

    t, folder, name = settings.cfg, settings.folder, settings.folder.name
    student, tokenizer = settings.student, settings.tokenizer
    ckpt_dir = folder.local.working_dir("checkpoints")
    tb_dir = folder.local.working_dir("tensorboard")
    args = sft_config(t, ckpt_dir, use_cpu=not torch.cuda.is_available())
    main_process = args.process_index == 0
    # The main process has prepared the folder (under the lock) before it came here; the
    # others wait for it, then each machine's first process fetches the checkpoints of a run
    # folder on object storage, so that every process resumes from the same one.
    with args.main_process_first(local=False, desc="prepare the train folder"):
        pass
    with args.main_process_first(local=True, desc="fetch checkpoints"):
        if not folder.run.is_local and args.local_process_index == 0:
            folder.local.mirror_down("checkpoints", ckpt_dir)
    training_log = JsonlLogCallback(lambda records: folder.write_jsonl("log.jsonl", records),
                                    folder.read_jsonl("log.jsonl"))
    callbacks = [training_log, SealCheckpoints()]
    if not folder.run.is_local:
        def upload() -> None:
            folder.local.mirror_up(ckpt_dir, "checkpoints")
            if tb_dir.is_dir():
                folder.local.mirror_up(tb_dir, "tensorboard")

        callbacks.append(OnSave(upload))
    with tensorboard_dir(tb_dir):
        trainer = DSSTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(examples),
                             eval_dataset=Dataset.from_list(heldout_examples)
                             if heldout_examples else None,
                             data_collator=DSSCollator(student, tokenizer.pad_token_id),
                             terms=settings.terms, student=student, callbacks=callbacks)

    last = last_complete_checkpoint(ckpt_dir, lambda line: log(name, line))
    t0 = time.time()
    state = _trainer_state(last)
    finished = state is not None and state["global_step"] >= state["max_steps"] > 0
    if finished:
        # the training had ended at that checkpoint (the adapter was not published): training
        # "from" it again would take a step past train.max_steps, so its weights are the ones
        log(name, f"{Path(last).name} is the last step of this training: its adapter is "
            "published as it is")
        steps = state["global_step"]
        train_loss = next((r["train_loss"] for r in reversed(training_log.records)
                           if "train_loss" in r), float("nan"))
    else:
        if last:
            log(name, f"resuming from {last}")
        result = trainer.train(resume_from_checkpoint=last)
        steps, train_loss = result.global_step, result.training_loss
    if not main_process:
        return steps, train_loss, None
    built = folder.local.working_dir("adapter.tmp")
    shutil.rmtree(built, ignore_errors=True)
    if finished:
        built.mkdir(parents=True)
        for file in Path(last).iterdir():
            if file.name.startswith("adapter_") or file.name == "README.md":
                shutil.copy2(file, built / file.name)
    else:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(built)
    tokenizer.save_pretrained(built)
    if tb_dir.is_dir():
        folder.local.mirror_up(tb_dir, "tensorboard")
    log(name, f"done: {steps} steps, loss {train_loss:.4f}, {time.time() - t0:.0f}s")
    return steps, train_loss, built


def _trainer_state(checkpoint: str | None) -> dict | None:
    """The Trainer's state saved in a (complete) checkpoint: its `global_step`, `max_steps`."""
    if checkpoint is None:
        return None
    import json

    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        return {"global_step": int(state["global_step"]), "max_steps": int(state["max_steps"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
