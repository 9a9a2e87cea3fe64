"""Stage 3, train: Distilling Step-by-Step on the kept traces, with LoRA.

Reads the filter stage's kept shards; writes `train/adapter/` (LoRA weights and tokenizer),
`train/log.jsonl` and checkpoints under `train/checkpoints/` (a stopped run resumes from the
last one). A named variant (`train.name=kd`) writes the same into `train-kd/` instead, so
students trained with other settings or seeds on the same traces sit side by side. The loss is
the sum of the loss terms the settings switch on (`trainer.losses`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

from pipeline.config import Config, ConfigError, TrainConfig, fingerprinted
from pipeline.fingerprints import fingerprint, manifest_digest
from pipeline.log import log
from pipeline.run_folder import RunFolder, as_run_folder
from pipeline.schema import logical, topk_columns
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
    """The kept traces the examples are built from, each shard checked as it is read; with
    `with_topk`, the teacher's top-k as float32 `topk_ids` / `topk_logprobs` whatever format
    the shard stores them in."""
    columns = ["id", "question", "gold", "pred_answer", "rationale"]
    if token_targets:
        columns += ["completion", "token_ids"]

    def wanted(schema):  # the top-k columns of the shard's own format (1 or 2)
        return columns + [c for c in topk_columns(schema) if c not in columns] if with_topk \
            else columns

    def float32_topk(table):  # only what the examples use: no Python objects for the rest
        return logical(table).select(columns + ["topk_ids", "topk_logprobs"])

    return kept.read_tables([s["outputs"]["kept"] for s in upstream["shards"]],
                            columns=wanted, each=float32_topk if with_topk else None,
                            then="Run `distill filter` (`make filter`) to remake it, then "
                            "train again").to_pylist()


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


def _unit(row_id: str) -> float:
    """A question's place in [0, 1), from a hash of its id."""
    digest = hashlib.sha256(str(row_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def keep_share(rows: list[dict], share: float) -> list[dict]:
    """The rows of a `share` of the questions, chosen by a hash of their id: the same for
    every seed, and a smaller share is a subset of a larger one."""
    if share >= 1:
        return rows
    return [r for r in rows if _unit(r["id"]) < share]


def hold_out(rows: list[dict], share: float) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the questions whose hash falls in the last `share`
    are held out, so a `keep_share` of the rest never takes one of them."""
    if share <= 0:
        return rows, []
    return ([r for r in rows if _unit(r["id"]) < 1 - share],
            [r for r in rows if _unit(r["id"]) >= 1 - share])


def main(cfg: Config, run: RunFolder | str | Path, force: bool = False) -> dict | None:
    """Train the student; under `torchrun` / `accelerate launch` every process trains and the
    main one writes (the others return None)."""
    import torch
    from datasets import Dataset

    from pipeline.lock import StageLock
    from trainer.arguments import sft_config, tensorboard_dir
    from pipeline.models import load_tokenizer, model_revision, resolve_model, \
        tokenizer_fingerprint
    from trainer.dss import (DSSTrainer, JsonlLogCallback, OnSave, SealCheckpoints,
                             last_complete_checkpoint)
    from trainer.examples import DSSCollator, build_examples
    from trainer.lora import lora_student
    from trainer.losses import terms_from_settings
    from trainer.students import student_for

    # ---- up to date?
    run, t = as_run_folder(run), cfg.train
    from trainer.arguments import check_args

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
    fp = fingerprint(settings)
    # Read-only here: every process of a multi-process run must come to the same answer.
    manifest = folder.manifest()
    if (not force and manifest is not None and manifest.get("fingerprint") == fp
            and folder.intact(manifest)):
        log(folder.name, f"up to date (fingerprint {fp}): nothing to do")
        return manifest

    # ---- the examples
    tokenizer = load_tokenizer(student_path, padding_side="right")
    generate_facts = (run.stage("generate").manifest() or {}).get("facts", {})
    token_targets, used = loss_settings(cfg, generate_facts, tokenizer)
    kd_lam = used.kd_lam
    terms = terms_from_settings(used)
    topk_parts = {term.part for term in terms if "topk" in term.needs}
    rows = kept_rows(kept, upstream, token_targets, bool(topk_parts))
    rows, heldout = hold_out(rows, t.heldout_share)
    n_kept = len(rows)
    rows = keep_share(rows, t.data_fraction)
    if t.heldout_share > 0:
        log(folder.name, f"train.heldout_share={t.heldout_share:g}: {len(heldout)} kept traces "
            "held out for the held-out loss (eval_loss)")
        if not heldout:
            raise ValueError(f"train.heldout_share={t.heldout_share:g} holds out none of the "
                             f"{n_kept} kept traces; raise it or set it to 0")
    if t.data_fraction < 1:
        log(folder.name, f"train.data_fraction={t.data_fraction:g}: {len(rows)} of {n_kept} "
            "kept traces")
    if not rows and n_kept:
        raise ValueError(f"train.data_fraction={t.data_fraction:g} leaves none of the {n_kept} "
                         "kept traces; raise it")
    if not rows:
        raise ValueError("the filter kept no traces, so there is nothing to train on; see "
                         f"{kept.where('funnel.json')} for why they were dropped, and loosen "
                         "the filter or generate more (task.n_train, generate.n_samples)")
    def examples_of(part: list[dict]) -> list[dict]:
        return build_examples(part, tokenizer, student, t.max_length,
                              teacher_tokens=token_targets, with_topk="explain" in topk_parts,
                              answer_tokens=used.answer_kd_lam > 0)

    examples = examples_of(rows)
    if used.answer_kd_lam > 0:
        import math

        top1 = [math.exp(lps[0]) for ex in examples
                for ids, lps in zip(ex["predict"]["topk_ids"], ex["predict"]["topk_logprobs"])
                if ids and ids[0] >= 0]
        found = sum(any(ids and ids[0] >= 0 for ids in ex["predict"]["topk_ids"])
                    for ex in examples)
        log(folder.name, f"answer KD: {found} of {len(examples)} traces write their answer as "
            f"is (their targets are the teacher's answer tokens); the teacher's top-1 "
            f"probability there is {sum(top1) / max(1, len(top1)):.3f} on average")
    log(folder.name, ("explain targets: the teacher's own rationale tokens" + (
        f"; KD on them: lam={kd_lam}, T={t.kd_temperature}, beta={t.kd_beta}, "
        f"tail={t.kd_tail}" if kd_lam > 0 else "")) if token_targets else
        "explain targets: the rationale text, tokenised by the student")
    log(folder.name, f"{len(rows)} kept traces -> {len(rows)} predict + {len(rows)} explain "
        f"examples; student {t.student}; loss terms: "
        + ", ".join(f"{term.name} x {term.weight:g}" for term in terms))

    # ---- the student and the trainer
    torch.manual_seed(t.seed)
    model = lora_student(student_path, t, student)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log(folder.name, f"LoRA r={t.lora_r}: {n_trainable:,} trainable of {n_total:,} parameters")
    ckpt_dir, tb_dir = folder.working_dir("checkpoints"), folder.working_dir("tensorboard")
    args = sft_config(t, ckpt_dir, use_cpu=not torch.cuda.is_available())
    # The main process holds the stage's lock (one writer) until the adapter is published and
    # alone prepares the folder (setting other settings' output aside); the others wait for
    # it, then each machine's first process fetches the checkpoints of a run folder on object
    # storage, so that every process resumes from the same one.
    lock = StageLock(folder) if args.process_index == 0 else None
    with lock or contextlib.nullcontext():
        with args.main_process_first(local=False, desc="prepare the train folder"):
            if lock is not None:
                folder.clean_temporary()
                if folder.begin(fp, settings, force) is not None:
                    folder.drop_manifest()
                    log(folder.name, "the adapter is missing or damaged: training again")
        with args.main_process_first(local=True, desc="fetch checkpoints"):
            if not run.is_local and args.local_process_index == 0:
                folder.mirror_down("checkpoints", ckpt_dir)
        training_log = JsonlLogCallback(
            lambda records: folder.write_jsonl("log.jsonl", records),
            folder.read_jsonl("log.jsonl"))
        callbacks = [training_log, SealCheckpoints()]
        if not run.is_local:
            def upload() -> None:
                folder.mirror_up(ckpt_dir, "checkpoints")
                if tb_dir.is_dir():
                    folder.mirror_up(tb_dir, "tensorboard")

            callbacks.append(OnSave(upload))
        with tensorboard_dir(tb_dir):
            trainer = DSSTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(examples),
                                 eval_dataset=Dataset.from_list(examples_of(heldout))
                                 if heldout else None,
                                 data_collator=DSSCollator(student, tokenizer.pad_token_id),
                                 terms=terms, student=student, callbacks=callbacks)

        # ---- train (from the last complete checkpoint), then publish the adapter and commit
        last = last_complete_checkpoint(ckpt_dir, lambda line: log(folder.name, line))
        if last:
            log(folder.name, f"resuming from {last}")
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=last)
        if lock is None:  # the main process writes the adapter and the manifest
            return None
        lock.check()
        built = folder.working_dir("adapter.tmp")
        shutil.rmtree(built, ignore_errors=True)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(built)
        tokenizer.save_pretrained(built)
        folder.publish_dir(built, "adapter")
        if tb_dir.is_dir():
            folder.mirror_up(tb_dir, "tensorboard")
        manifest = folder.write_manifest({
            "stage": "train", "fingerprint": fp, "settings": settings,
            "upstream": {"filter": upstream["fingerprint"], "digest": manifest_digest(upstream)},
            "facts": {"student": t.student, "student_revision": model_revision(student_path),
                      "student_kind": student.name,
                      "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                      "trainable_parameters": n_trainable, "kd_lam_used": kd_lam,
                      "explain_targets": "tokens" if token_targets else "text",
                      "loss_terms": {term.name: term.weight for term in terms}, "name": t.name},
            "counters": {"traces": len(rows), "steps": result.global_step,
                         "train_loss": round(result.training_loss, 4)},
            "files": folder.entries_under("adapter"),
            "seconds": round(time.time() - t0, 1),
        })
    log(folder.name, f"done: {result.global_step} steps, loss {result.training_loss:.4f}, "
        f"{time.time() - t0:.0f}s -> {folder.where('adapter')}")
    return manifest
