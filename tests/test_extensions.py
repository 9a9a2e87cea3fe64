"""Each of the six extensions is one new file (a backend with its own settings in it; for a
check or a loss term, also its setting): a throwaway teacher backend, filter check, loss term,
executor, student kind and answer kind, each written
into a temporary folder that joins its package (as a file dropped into `stages/backends/`
would), then run through the real stages. No other file of the project is touched."""

from __future__ import annotations

import importlib
import sys
import textwrap
from contextlib import contextmanager

import pytest

import stages.filter.stage as filter_stage
import stages.generate.stage as generate
from pipeline.config import ConfigError, describe, load_config, section_type
from pipeline.registry import BACKENDS, EXECUTORS, STUDENT_KINDS
from stages.checks.traces import CHECKS
from trainer.losses.base import TERMS


@contextmanager
def dropped_in(tmp_path, package: str, registry, code: str):
    """`code` as a new file of `package` (in a folder of its own that joins the package's
    path), found by the registry as any file of the package is; taken out again after."""
    folder = tmp_path / f"{package.replace('.', '_')}_extra"
    folder.mkdir()
    name = f"extra_{package.replace('.', '_')}"
    (folder / f"{name}.py").write_text(textwrap.dedent(code))
    home = importlib.import_module(package)
    before = set(registry.names())
    home.__path__.append(str(folder))
    try:
        registry.rescan()
        yield sorted(set(registry.names()) - before)
    finally:
        home.__path__.remove(str(folder))
        for added in set(registry.names()) - before:
            registry.unregister(added)
        sys.modules.pop(f"{package}.{name}", None)


BACKEND = '''
    """A teacher that adds the numbers of the question (right for the demo's additions), and
    a setting of its own (`generate.sum_offset`, added to every answer)."""
    import re
    from dataclasses import dataclass

    import numpy as np

    from pipeline.config import IF_READ, opt
    from pipeline.registry import BACKENDS
    from stages.backends.base import BackendKind, Generation


    @dataclass
    class SumSettings:
        sum_offset: int = opt(0, "sum: added to every answer.", ge=0, fingerprint=IF_READ)


    class SumBackend:
        name = "sum"

        def __init__(self, offset=0):
            self.offset = offset

        def facts(self):
            return {"backend": "sum", "teacher": "sum", "teacher_revision": "1"}

        def generate(self, prompts, settings):
            out = []
            for prompt in prompts:
                numbers = [int(n) for n in re.findall(r"\\d+", prompt.rsplit("Question:", 1)[-1])]
                total = sum(numbers) + self.offset
                text = f" {' + '.join(map(str, numbers))} = {total}. The answer is {total}."
                t, k = 8, max(settings.top_k, 1)
                ids = np.arange(t, dtype=np.int32)
                gen = Generation(text, "stop", ids, np.full(t, -0.1, np.float32),
                                 (ids[:, None] + np.arange(k)[None, :]).astype(np.int32),
                                 np.tile(-np.arange(k, dtype=np.float32), (t, 1)) - 0.1)
                out.append([gen] * settings.n)
            return out


    BACKENDS.register(BackendKind(
        "sum", lambda cfg, cache, seed: SumBackend(cfg.generate.sum_offset), settings=SumSettings))
'''

EXECUTOR = '''
    """An executor that does the shards last to first, in this process."""
    import time

    from pipeline.executors.base import ExecutorKind, commit, up_to_date, work_through, writing
    from pipeline.registry import EXECUTORS


    class ReverseExecutor:
        workers_apart = False
        order = []

        def run(self, stage, folder, force=False):
            with writing(folder) as lock:
                manifest = up_to_date(stage, folder, force)
                if manifest is not None:
                    return manifest
                started = time.time()
                done = work_through(stage, folder, stage.shards[::-1], lambda rows=0, **c: None)
                ReverseExecutor.order.extend(d.shard.name for d in done)
                return commit(stage, folder, done[::-1], started, lock)


    EXECUTORS.register(ExecutorKind("reverse", lambda workers, cfg: ReverseExecutor()))
'''

CHECK = '''
    """A check that drops traces whose answer is odd, recording the answer's parity."""
    import pyarrow as pa

    from stages.checks.traces import CHECKS, Check


    def odd_answer(trace, cfg):
        parity = "odd" if int(float(trace.added["pred_answer"])) % 2 else "even"
        trace.added["answer_parity"] = parity
        return f"the answer {trace.added['pred_answer']} is odd" if parity == "odd" else None


    CHECKS.register(Check("odd_answer", "the answer is odd", 105, odd_answer,
                          records=(("answer_parity", pa.string()),)))
'''

LOSS_TERM = '''
    """Entropy of the student's answer distribution, weighted by train.entropy_weight."""
    from trainer.losses.base import register


    @register
    class PredictEntropy:
        name, part, needs, switch = "predict_entropy", "predict", frozenset(), "entropy_weight"

        def __init__(self, weight):
            self.weight = weight

        def weight_at(self, step):
            return self.weight

        @classmethod
        def from_settings(cls, t):
            return cls(t.entropy_weight) if getattr(t, "entropy_weight", 0) > 0 else None

        def __call__(self, ctx):
            logp = ctx.outputs(self.part).logits.log_softmax(-1)
            return -(logp.exp() * logp).sum(-1).mean()
'''

STUDENT = '''
    """GPT-2 students: the decoder-only interface with GPT-2's own LoRA targets."""
    from pipeline.registry import STUDENT_KINDS
    from trainer.students.causal_lm import CausalLMStudent


    @STUDENT_KINDS.register
    class GPT2Student:
        name, task_type, decoder_only, generic = "gpt2", "CAUSAL_LM", True, False
        lora_targets = ["c_attn", "c_proj"]

        def __init__(self):
            self._inner = CausalLMStudent()

        @classmethod
        def fits(cls, config):
            return config.model_type == "gpt2"

        def __getattr__(self, name):  # load, encode, collate, target_logits
            return getattr(self._inner, name)
'''


ANSWER_KIND = '''
    """Yes/no answers: `Yes.`, `no, because ...`."""
    import re

    from pipeline.registry import ANSWER_KINDS
    from stages.checks.answers import AnswerKind


    @ANSWER_KINDS.register
    class YesNoAnswers(AnswerKind):
        name = "yesno"
        order = ("answer_is", "answer_colon", "last_line")

        def read(self, span, question):
            m = re.match(r"\\W*(yes|no)\\b", span.lower())
            return (m.group(1), "") if m else None

        def gold(self, gold, question):
            return str(gold).strip().lower()

        def match(self, pred, gold, question):
            return pred == self.gold(gold, question)
'''


class _Chars:
    """A tiny tokenizer: one id per character, eos = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 120 + 1 for c in text]}


def _batch(student):
    """A batch of three (predict, explain) example pairs, as the trainer gets them."""
    from trainer.examples import DSSCollator, build_examples

    rows = [{"question": f"q{i}", "gold": str(i), "pred_answer": str(i),
             "rationale": f"{i} + 0 = {i}."} for i in range(3)]
    return DSSCollator(student, 0)(build_examples(rows, _Chars(), student, 48))


def _config(*more: str):
    return load_config("configs/demo.yaml", [
        "generate.backend=sum", "task.n_train=24", "generate.rows_per_shard=8",
        "generate.n_samples=1", "filter.min_steps=0", *more])


def test_a_backend_and_an_executor_are_one_file_each(tmp_path):
    with dropped_in(tmp_path, "stages.backends", BACKENDS, BACKEND) as backends, \
            dropped_in(tmp_path, "pipeline.executors", EXECUTORS, EXECUTOR) as executors:
        assert backends == ["sum"] and executors == ["reverse"]
        cfg = _config()  # the settings take the new names
        made = generate.main(cfg, tmp_path / "run")
        assert made["facts"]["backend"] == "sum" and made["counters"]["traces"] == 24
        local = filter_stage.main(cfg, tmp_path / "run")
        assert local["counters"]["kept"] > 0
        other = filter_stage.main(_config("filter.executor=reverse"), tmp_path / "run",
                                  force=True)
        module = sys.modules["pipeline.executors.extra_pipeline_executors"]
        assert module.ReverseExecutor.order == ["00002", "00001", "00000"]
        assert [f["sha256"] for f in other["files"]] == [f["sha256"] for f in local["files"]]
        with pytest.raises(ConfigError, match="did you mean 'sum'"):
            _config("generate.backend=sums")
        # its own setting joins the generate section: declared once, in its file
        assert "generate.sum_offset = 0" in describe(section_type("generate"))
        with pytest.raises(ConfigError, match="generate.sum_offset: -1 is out of range"):
            _config("generate.sum_offset=-1")
        shifted = generate.main(_config("generate.sum_offset=1"), tmp_path / "shifted")
        assert shifted["fingerprint"] != made["fingerprint"]  # it decides what sum makes
        wrong = filter_stage.main(_config("generate.sum_offset=1"), tmp_path / "shifted")
        assert wrong["counters"]["kept"] == 0  # every answer is off by one
    with pytest.raises(ConfigError, match="available: hf, openai, vllm"):  # taken out again
        _config()
    with pytest.raises(ConfigError, match="unknown key 'generate.sum_offset'"):
        load_config("configs/demo.yaml", ["generate.sum_offset=1"])


def test_a_filter_check_is_one_file(tmp_path):
    with dropped_in(tmp_path, "stages.backends", BACKENDS, BACKEND):
        cfg = _config()
        generate.main(cfg, tmp_path / "run")
        before = filter_stage.main(cfg, tmp_path / "run")
        with dropped_in(tmp_path, "stages.checks", CHECKS, CHECK) as checks:
            assert checks == ["odd_answer"]
            after = filter_stage.main(cfg, tmp_path / "run", force=True)
            kept = filter_stage.as_run_folder(tmp_path / "run").stage("filter").read_tables(
                [s["outputs"]["kept"] for s in after["shards"]])
    c = after["counters"]
    assert c["dropped:odd_answer"] > 0
    assert c["kept"] + c["dropped:odd_answer"] == before["counters"]["kept"]
    assert set(kept.column("answer_parity").to_pylist()) == {"even"}
    assert "odd_answer" not in filter_stage.reasons()  # taken out again


def test_a_loss_term_is_one_file_and_its_setting(tmp_path):
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import UNLESS_DEFAULT, fingerprinted, opt
    from trainer.settings import TrainConfig
    from trainer.losses import terms_from_settings
    from trainer.losses.base import LossContext
    from trainer.students.causal_lm import CausalLMStudent

    @dataclasses.dataclass
    class Settings(TrainConfig):  # the term's setting, as a field of the train section
        entropy_weight: float = opt(0.0, "Weight of the answer entropy.", ge=0.0,
                                    fingerprint=UNLESS_DEFAULT)

    with dropped_in(tmp_path, "trainer.losses", TERMS, LOSS_TERM) as terms:
        assert terms == ["predict_entropy"]
        assert "predict_entropy" not in {t.name for t in terms_from_settings(Settings())}
        assert fingerprinted(Settings()) == fingerprinted(TrainConfig())  # off: no retraining
        (term,) = [t for t in terms_from_settings(Settings(entropy_weight=0.1))
                   if t.name == "predict_entropy"]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32,
                                             intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
        student = CausalLMStudent()

        batch = _batch(student)
        value = term(LossContext(model, batch, student, 0))
        assert value.item() > 0 and value.requires_grad
    assert "predict_entropy" not in TERMS.names()


def test_a_student_kind_is_one_file(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainer.settings import TrainConfig
    from trainer.lora import lora_student
    from trainer.students import student_for

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    assert student_for(str(folder)).name == "causal_lm"  # the generic kind takes it
    with dropped_in(tmp_path, "trainer.students", STUDENT_KINDS, STUDENT) as kinds:
        assert kinds == ["gpt2"]
        student = student_for(str(folder))
        assert student.name == "gpt2"
        model = lora_student(str(folder), TrainConfig(dtype="float32"), student)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        assert any("c_attn" in n for n in trainable)  # the kind's own LoRA targets
        logits, targets = student.target_logits(model, _batch(student)["explain"])
        torch.nn.functional.cross_entropy(logits.float(), targets).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert student_for(str(folder)).name == "causal_lm"


def test_an_answer_kind_is_one_file(tmp_path):
    from pipeline.registry import ANSWER_KINDS
    from stages.checks.answers import answer_checker
    from test_filter import _filter, _trace

    data = tmp_path / "yesno.jsonl"
    data.write_text('{"question": "Is 7 odd?", "answer": "yes"}\n')
    overrides = ["task.kind=file", f"task.train_path={data}", "task.answer_type=yesno"]
    with dropped_in(tmp_path, "stages.checks", ANSWER_KINDS, ANSWER_KIND) as kinds:
        assert kinds == ["yesno"]
        checker = answer_checker(load_config("configs/demo.yaml", overrides))
        found = checker.extract("7 is not divisible by 2, so it is odd. The answer is Yes.")
        assert (found.answer, found.extractor) == ("yes", "answer_is")
        assert checker.match(found.answer, "YES") and not checker.match("no", "yes")
        out = _filter([_trace(" 7 = 2 x 3 + 1, so it is odd. The answer is yes.", gold="Yes"),
                       _trace(" 7 = 2 x 3 + 1, so it is odd. The answer is no.", gold="Yes"),
                       _trace(" 7 = 2 x 3 + 1. The answer is maybe.", gold="Yes")],
                      checker=checker)
        assert out.tables["kept"].num_rows == 1
        assert sorted(out.tables["rejected"].column("reason").to_pylist()) == [
            "no_answer", "wrong_answer"]
    with pytest.raises(ConfigError, match="task.answer_type: 'yesno' is not allowed"):
        load_config("configs/demo.yaml", overrides)  # taken out again
