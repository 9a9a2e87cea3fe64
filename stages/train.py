"""Stage 3, train: Distilling Step-by-Step on the kept traces, with LoRA.

Reads the filter stage's kept shards; writes `train/adapter/` (LoRA weights and tokenizer),
`train/log.jsonl` and checkpoints under `train/checkpoints/` (a stopped run resumes from the
last one). A named variant (`train.name=kd`) writes the same into `train-kd/` instead, so
students trained with other settings or seeds on the same traces sit side by side.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline import store
from pipeline.config import Config
from pipeline.runner import log, prepare_stage_dir


_KD_KNOBS = ("kd_temperature", "kd_beta", "kd_tail")


def train_dir(run_dir: Path, name: str = "") -> Path:
    """The stage folder of a trained variant: train/ for the unnamed one, train-<name>/ else."""
    return run_dir / (f"train-{name}" if name else "train")


def train_settings(cfg: Config, upstream: dict) -> dict:
    """What decides the adapter; the KD knobs only count when KD is on, the name never."""
    section = {k: v for k, v in cfg.section("train").items() if k != "name"}
    if section["kd_lam"] <= 0:
        section = {k: v for k, v in section.items() if k not in _KD_KNOBS}
    return {"train": section, "filter_digest": store.manifest_digest(upstream)}


def target_plan(cfg: Config, run_dir: Path, tokenizer) -> tuple[bool, float]:
    """(explain targets are the teacher's own tokens?, KD weight actually used).

    Token targets need the student to share the teacher's tokenizer and token ids that spell
    the text (`usable_for_kd`); KD needs both and stored top-k rows. Asking for either when the
    tokenizers differ is an error naming both; `auto` and KD fall back to text-only training,
    said in the log, when the ids or the log-probabilities are not usable.
    """
    from pipeline.models import tokenizer_fingerprint

    t = cfg.train
    facts = (store.read_manifest(run_dir / "generate") or {}).get("facts", {})
    mine = tokenizer_fingerprint(tokenizer)
    teacher_vocab, student_vocab = facts.get("vocab_size"), len(tokenizer)
    same = facts.get("tokenizer_fingerprint") == mine and (
        teacher_vocab is None or teacher_vocab >= student_vocab)
    usable = facts.get("usable_for_kd", True)
    wants = "KD (train.kd_lam > 0)" if t.kd_lam > 0 else (
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


def main(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.models import load_tokenizer, model_revision, resolve_model, \
        tokenizer_fingerprint
    from trainer.dss import DSSTrainer, JsonlLogCallback
    from trainer.examples import PairCollator, build_examples, build_token_examples
    from trainer.model import lora_student

    t = cfg.train
    filter_dir = run_dir / "filter"
    upstream = store.read_manifest(filter_dir)
    if upstream is None:
        raise FileNotFoundError(f"no finished filter stage in {filter_dir}; run `make filter` "
                                "for this run first")
    stage_dir = train_dir(run_dir, t.name)
    settings = train_settings(cfg, upstream)
    fp = store.fingerprint(settings)
    manifest = prepare_stage_dir("train", stage_dir, fp, settings, force)
    adapter_dir = stage_dir / "adapter"
    if manifest is not None and (adapter_dir / "adapter_config.json").is_file():
        log("train", f"up to date (fingerprint {fp}): nothing to do")
        return manifest

    student_path = resolve_model(t.student)
    tokenizer = load_tokenizer(student_path, padding_side="right")
    token_targets, kd_lam = target_plan(cfg, run_dir, tokenizer)
    kept_files = [s["outputs"]["kept"]["file"] for s in upstream["shards"]]
    columns = ["id", "question", "gold", "pred_answer", "rationale"]
    if token_targets:
        columns += ["completion", "token_ids"]
    if kd_lam > 0:
        columns += ["topk_ids", "topk_logprobs"]
    rows = store.read_shards(filter_dir, kept_files, columns=columns).to_pylist()
    if not rows:
        raise ValueError("the filter kept no traces, so there is nothing to train on; see "
                         f"{filter_dir / 'funnel.json'} for why they were dropped, and loosen "
                         "the filter or generate more (task.n_train, generate.n_samples)")
    if token_targets:
        examples = build_token_examples(rows, tokenizer, t.max_length, with_topk=kd_lam > 0)
        log("train", "explain targets: the teacher's own rationale tokens" + (
            f"; KD on them: lam={kd_lam}, T={t.kd_temperature}, beta={t.kd_beta}, "
            f"tail={t.kd_tail}" if kd_lam > 0 else ""))
    else:
        examples = build_examples(rows, tokenizer, t.max_length)
        log("train", "explain targets: the rationale text, tokenised by the student")
    log("train", f"{len(rows)} kept traces -> {len(rows)} predict + {len(rows)} explain "
        f"examples; student {t.student}")

    torch.manual_seed(t.seed)
    model = lora_student(student_path, t)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log("train", f"LoRA r={t.lora_r}: {n_trainable:,} trainable of {n_total:,} parameters")

    ckpt_dir = stage_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs, max_steps=t.max_steps, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, lr_scheduler_type="cosine", logging_steps=t.logging_steps,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, seed=t.seed,
        data_seed=t.seed, report_to="none", remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        logging_first_step=True, disable_tqdm=False)
    trainer = DSSTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                         data_collator=PairCollator(tokenizer.pad_token_id), alpha=t.alpha,
                         kd_lam=kd_lam, kd_temperature=t.kd_temperature, kd_beta=t.kd_beta,
                         kd_tail=t.kd_tail, explain_warmup_steps=t.explain_warmup_steps,
                         callbacks=[JsonlLogCallback(stage_dir / "log.jsonl")])
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last:
        log("train", f"resuming from {last}")
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    tmp = stage_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    manifest = {
        "stage": "train", "fingerprint": fp, "settings": settings,
        "upstream": {"filter": upstream["fingerprint"],
                     "digest": store.manifest_digest(upstream)},
        "facts": {"student": t.student, "student_revision": model_revision(student_path),
                  "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                  "trainable_parameters": n_trainable, "kd_lam_used": kd_lam,
                  "explain_targets": "tokens" if token_targets else "text",
                  "name": t.name},
        "counters": {"traces": len(rows), "steps": result.global_step,
                     "train_loss": round(result.training_loss, 4)},
        "files": [{"file": str(p.relative_to(stage_dir)), "bytes": p.stat().st_size,
                   "sha256": store.file_sha256(p)} for p in sorted(adapter_dir.iterdir())
                  if p.is_file()],
        "seconds": round(time.time() - t0, 1),
    }
    store.write_manifest(stage_dir, manifest)
    log("train", f"done: {result.global_step} steps, loss {result.training_loss:.4f}, "
        f"{time.time() - t0:.0f}s -> {adapter_dir}")
    return manifest
