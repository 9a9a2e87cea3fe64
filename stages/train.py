"""Stage 3, train: Distilling Step-by-Step on the kept traces, with LoRA.

Reads the filter stage's kept shards; writes `train/adapter/` (LoRA weights and tokenizer),
`train/log.jsonl` and checkpoints under `train/checkpoints/` (a stopped run resumes from the
last one).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline import store
from pipeline.config import Config
from pipeline.runner import log, prepare_stage_dir


def train_settings(cfg: Config, upstream: dict) -> dict:
    return {"train": cfg.section("train"), "filter_digest": store.manifest_digest(upstream)}


def main(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.models import load_tokenizer, model_revision, resolve_model, \
        tokenizer_fingerprint
    from trainer.dss import DSSTrainer, JsonlLogCallback
    from trainer.examples import PairCollator, build_examples
    from trainer.model import lora_student

    t = cfg.train
    filter_dir = run_dir / "filter"
    upstream = store.read_manifest(filter_dir)
    if upstream is None:
        raise FileNotFoundError(f"no finished filter stage in {filter_dir}; run `make filter` "
                                "for this run first")
    stage_dir = run_dir / "train"
    settings = train_settings(cfg, upstream)
    fp = store.fingerprint(settings)
    manifest = prepare_stage_dir("train", stage_dir, fp, settings, force)
    adapter_dir = stage_dir / "adapter"
    if manifest is not None and (adapter_dir / "adapter_config.json").is_file():
        log("train", f"up to date (fingerprint {fp}): nothing to do")
        return manifest

    kept_files = [s["outputs"]["kept"]["file"] for s in upstream["shards"]]
    rows = store.read_shards(filter_dir, kept_files, columns=[
        "id", "question", "gold", "pred_answer", "rationale"]).to_pylist()
    if not rows:
        raise ValueError("the filter kept no traces, so there is nothing to train on; see "
                         f"{filter_dir / 'funnel.json'} for why they were dropped, and loosen "
                         "the filter or generate more (task.n_train, generate.n_samples)")
    student_path = resolve_model(t.student)
    tokenizer = load_tokenizer(student_path, padding_side="right")
    examples = build_examples(rows, tokenizer, t.max_length)
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
                  "trainable_parameters": n_trainable},
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
