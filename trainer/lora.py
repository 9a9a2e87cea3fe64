"""LoRA on a student: adapters on its named layers for training, merged back for generation."""

from __future__ import annotations

from trainer.settings import TrainConfig
from trainer.students.base import Student


def lora_targets(cfg: TrainConfig, student: Student) -> list[str]:
    """The layers that get adapters: `train.lora_targets`, or the student kind's usual ones."""
    return list(cfg.lora_targets) if cfg.lora_targets is not None else list(student.lora_targets)


def lora_student(path: str, cfg: TrainConfig, student: Student):
    """The frozen student weights in `cfg.dtype`, wrapped with LoRA adapters on its
    `lora_targets`; peft keeps the adapters themselves in float32."""
    from peft import LoraConfig, get_peft_model

    model = student.load(path, cfg.dtype)
    targets = lora_targets(cfg, student)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D")} - {"lm_head"})
        raise ValueError(f"train.lora_targets {missing} are not modules of the student "
                         f"'{cfg.student}'; its linear layers are: {linear[:12]}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type=student.task_type)
    return get_peft_model(model, lora)


def load_distilled(base_path: str, adapter_dir: str, dtype: str, student: Student):
    """The base student with a trained adapter merged in, ready for fast generation."""
    from peft import PeftModel

    from pipeline.models import torch_dtype

    base = student.load(base_path, "float32")  # merge in float32, then cast
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return model.to(torch_dtype(dtype)).eval()


def save_merged(base_path: str, adapter_dir: str, dtype: str, student: Student, out: str) -> None:
    """The base student with the adapter merged in (`load_distilled`) saved to folder `out`
    with the adapter's tokenizer: a plain model folder an inference engine loads."""
    import torch

    from pipeline.models import load_tokenizer

    model = load_distilled(base_path, adapter_dir, dtype, student)
    with torch.no_grad():
        model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out)
