"""The student: a causal LM with LoRA adapters (peft)."""

from __future__ import annotations

from pipeline.config import TrainConfig


def lora_student(path: str, cfg: TrainConfig):
    """Load the frozen student weights in `cfg.dtype` and wrap them with LoRA adapters on
    `cfg.lora_targets`; peft keeps the adapters themselves in float32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.models import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg.dtype))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora_targets if t not in names]
    if missing:
        raise ValueError(f"train.lora_targets {missing} are not modules of the student "
                         f"'{cfg.student}'; its linear layers include: "
                         f"{sorted(n for n in names if n.endswith('proj'))[:12]}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_distilled(base_path: str, adapter_dir: str, dtype: str):
    """The base student with the trained adapter merged in, ready for fast generation."""
    from peft import PeftModel

    from pipeline.models import load_causal_lm

    from pipeline.models import torch_dtype

    base = load_causal_lm(base_path, "float32")
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return model.to(torch_dtype(dtype)).eval()
