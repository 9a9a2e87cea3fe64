"""The loss terms of the method family: answer KD, the margin cosine rationale loss and
consistency regularisation, each against its definition, and the weights they take."""

import pytest
import torch

from pipeline.config import ConfigError
from trainer.settings import TrainConfig
from trainer.examples import DSSCollator, answer_span, build_examples
from trainer.losses import terms_from_settings
from trainer.losses.consistency import consistency_kl, embedding_noise
from trainer.losses.cosine_rationale import margin_cosine_loss
from trainer.losses.topk_kd import topk_kd_loss
from trainer.students.causal_lm import CausalLMStudent

STUDENT = CausalLMStudent()


def _weights(**kw):
    return {t.name: round(t.weight_at(10**6), 6) for t in terms_from_settings(TrainConfig(**kw))}


def test_the_extended_loss_takes_its_weights_from_the_settings():
    """L = a L_hard + b L_rationale + (1 - a - b) T^2 L_KD + lam L_consistency, with the
    settings' names: a = alpha (1 - answer_kd_lam), b = (1 - alpha)(1 - kd_lam)."""
    assert _weights() == {"predict": 0.5, "explain": 0.5}  # nothing new unless asked
    assert _weights(alpha=0.6, answer_kd_lam=0.25) == {"predict": 0.45, "answer_kd": 0.15,
                                                       "explain": 0.4}
    assert _weights(alpha=1.0, answer_kd_lam=0.5) == {"predict": 0.5, "answer_kd": 0.5}
    assert _weights(alpha=0.5, rationale_loss="cosine", kd_lam=0.5) == {
        "predict": 0.5, "explain_cosine": 0.25, "kd": 0.25}
    assert _weights(consistency_lam=0.3) == {"predict": 0.5, "explain": 0.5,
                                             "consistency": 0.3}
    with pytest.raises(ConfigError, match="rationale_loss=cosine"):
        TrainConfig(rationale_loss="cosine", explain_targets="text")


def _teacher(n=6, k=4, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, vocab, generator=g) * 2
    logprobs = full.log_softmax(-1)
    values, ids = logprobs.topk(k, -1)
    return full, ids, values


def test_margin_cosine_is_zero_at_the_teacher_and_pulls_towards_it():
    full, ids, values = _teacher()
    assert margin_cosine_loss(full, ids, values).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros_like(full, requires_grad=True)  # uniform: far from the teacher
    loss = margin_cosine_loss(student, ids, values)
    assert 0 < loss.item() <= 1
    # the margin takes exactly its size off every position above it, and never goes below 0
    with torch.no_grad():
        per = [margin_cosine_loss(student[i:i + 1], ids[i:i + 1], values[i:i + 1]).item()
               for i in range(len(full))]
        margin = min(per) / 2
        want = sum(max(0.0, p - margin) for p in per) / len(per)
        assert margin_cosine_loss(student, ids, values, margin).item() == pytest.approx(want)
        assert margin_cosine_loss(student, ids, values, 0.999).item() == 0.0
    loss.backward()
    with torch.no_grad():
        assert margin_cosine_loss(student - 5 * student.grad, ids, values) < loss
    # no positions: a zero that still has a graph
    empty = torch.zeros(0, 30, requires_grad=True)
    assert margin_cosine_loss(empty, ids[:0], values[:0]).item() == 0.0


def test_answer_kd_is_the_topk_kd_at_the_answer_tokens(embedded_path):
    """The predict target becomes the teacher's own answer tokens, each with its top-k row;
    the eos and answers not written as is carry no row."""
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(embedded_path)
    completion = "Tom has 5 apples and gets 3 more. 5 + 3 = 8. The answer is 8."
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    k = 3
    row = {"question": "Tom has 5 apples and gets 3 more. How many?", "gold": "8",
           "pred_answer": "8", "completion": completion,
           "rationale": "Tom has 5 apples and gets 3 more. 5 + 3 = 8.", "token_ids": ids,
           "topk_ids": [[t, 1, 2] for t in ids], "topk_logprobs": [[-0.1, -3, -4]] * len(ids)}
    a, b = answer_span(tok, row)
    assert tok.decode(ids[a:b]).strip() == "8" and a > len(ids) // 2
    (ex,) = build_examples([row], tok, STUDENT, 128, answer_tokens=True)
    targets = [x for x in ex["predict"]["labels"] if x != -100]
    assert targets == ids[a:b] + [tok.eos_token_id]
    assert ex["predict"]["topk_ids"] == [[t, 1, 2] for t in ids[a:b]] + [[-1] * k]
    missing = dict(row, completion="I do not know.", pred_answer="8")
    (ex2,) = build_examples([missing], tok, STUDENT, 128, answer_tokens=True)
    assert all(r == [-1] * k for r in ex2["predict"]["topk_ids"])

    # the term on a batch: T^2 KD over the rows that have a teacher row, nothing else
    from trainer.losses.answer_kd import AnswerKD
    from trainer.losses.base import LossContext

    batch = DSSCollator(STUDENT, tok.pad_token_id)([ex, ex2])
    logits = torch.randn(int((batch["predict"]["labels"] != -100).sum()), len(tok))

    class Fixed:  # the student's logits, as given
        def target_logits(self, model, part, perturb=None):
            return logits, part["labels"][part["labels"] != -100]

    term = AnswerKD(0.5, temperature=2.0)
    got = term(LossContext(None, batch, Fixed(), 0))
    has = (batch["predict"]["topk_ids"] >= 0).any(-1)
    assert int(has.sum()) == b - a
    want = topk_kd_loss(logits[has], batch["predict"]["topk_ids"][has],
                        batch["predict"]["topk_logprobs"][has], 2.0)
    assert torch.allclose(got, want)


@pytest.mark.parametrize("kind", ["embedding", "dropout"])
def test_the_noise_touches_the_prompt_only_and_the_kl_is_zero_without_it(kind):
    torch.manual_seed(0)
    emb = torch.randn(2, 7, 16)
    where = torch.zeros(2, 7, dtype=torch.bool)
    where[:, 1:4] = True
    noisy = embedding_noise(kind, 0.5)(emb, where)
    assert torch.equal(noisy[~where], emb[~where])
    assert not torch.equal(noisy[where], emb[where])
    if kind == "dropout":  # dropped tokens are zeroed, the others kept exactly
        rows = noisy[where]
        assert all(torch.equal(r, torch.zeros(16)) or torch.equal(r, e)
                   for r, e in zip(rows, emb[where]))
    logits = torch.randn(5, 11)
    assert consistency_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency_kl(logits, logits + torch.randn(5, 11)).item() > 0
    with pytest.raises(ValueError, match="embedding"):
        embedding_noise("gaussian", 0.1)


def test_consistency_runs_a_noisy_forward_through_the_student(tmp_path):
    """On a real (tiny) model: the term is the KL between the clean and the noisy pass, and
    its gradient reaches the LoRA weights only through the noisy side."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.losses.base import LossContext
    from trainer.losses.consistency import Consistency

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        init_lora_weights=False))

    class Chars:
        eos_token_id = pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 120 + 1 for c in text]}

    rows = [{"question": f"question {i}", "gold": str(i), "pred_answer": str(i),
             "rationale": f"{i} = {i}."} for i in range(3)]
    batch = DSSCollator(STUDENT, 0)(build_examples(rows, Chars(), STUDENT, 64))
    assert batch["predict"]["prompt_mask"].sum() == sum(
        len(f"predict: question {i}\n") for i in range(3))
    quiet = Consistency(1.0, "embedding", 1e-9)
    assert quiet(LossContext(model, batch, STUDENT, 0)).item() == pytest.approx(0, abs=1e-6)
    term = Consistency(1.0, "embedding", 0.5)
    value = term(LossContext(model, batch, STUDENT, 0))
    assert value.item() > 1e-4
    value.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_distill_config_keys_lists_the_new_settings(capsys):
    from stages.commands.cli import main

    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("answer_kd_lam", "answer_kd_temperature", "rationale_loss", "cosine_margin",
                "consistency_lam", "consistency_noise", "consistency_amount", "data_fraction"):
        assert f"\n  train.{key} = " in out, key
