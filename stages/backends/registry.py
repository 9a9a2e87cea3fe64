"""The backends by name: `generate.backend` picks one, and each is imported only when used
(vLLM and the OpenAI client are heavy, and vLLM may not be installed)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import GenerateConfig, VLLMConfig
from stages.backends.base import Backend

BACKENDS = ("hf", "vllm", "openai")


def make_backend(cfg: GenerateConfig, cache_path: Path | None = None,
                 vllm_cfg: VLLMConfig | None = None, cache_seed: Path | None = None) -> Backend:
    """The backend named in `cfg`. `cache_path`: the openai backend's SQLite request cache
    (`cache_seed`: a read-only cache consulted after it); `vllm_cfg`: the vLLM engine's
    settings."""
    if cfg.backend == "hf":
        from stages.backends.hf import HFBackend

        return HFBackend(cfg.model, dtype=cfg.dtype, chat_template=cfg.chat_template)
    if cfg.backend == "vllm":
        from stages.backends.vllm_engine import VLLMBackend

        return VLLMBackend(cfg, vllm_cfg or VLLMConfig(), cfg.top_k)
    if cfg.backend == "openai":
        from stages.backends.openai_api import OpenAIBackend

        if cache_path is None:
            raise ValueError("the openai backend needs a path for its request cache")
        return OpenAIBackend(cfg, cache_path, cache_seed)
    raise ValueError(f"unknown backend {cfg.backend!r}; available: {', '.join(BACKENDS)}")


def make_vllm_student(cfg: GenerateConfig, vllm_cfg: VLLMConfig, lora_rank: int) -> Backend:
    """A vLLM engine for a student model (`cfg.model`) that also serves its LoRA adapters."""
    from stages.backends.vllm_engine import VLLMBackend

    return VLLMBackend(cfg, vllm_cfg, 0, lora_rank=lora_rank)
