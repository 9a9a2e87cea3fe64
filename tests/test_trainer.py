import pytest
import torch

from pipeline.config import TrainConfig
from trainer.dss import DSSTrainer, masked_ce
from trainer.examples import PairCollator, build_examples, encode_pair, task_prompt


class CharTokenizer:
    """A real (if tiny) tokenizer: one id per character, eos = 0."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 120 + 1 for c in text]}


def test_prompt_tokens_are_masked_and_targets_end_with_eos():
    tok = CharTokenizer()
    ex = encode_pair(tok, "predict: q\n", "42", max_length=64)
    n_prompt = len("predict: q\n")
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["labels"][-1] == tok.eos_token_id and len(ex["input_ids"]) == n_prompt + 3


def test_truncation_keeps_the_prompt_mask_exact():
    ex = encode_pair(CharTokenizer(), "explain: " + "x" * 20 + "\n", "y" * 100, max_length=40)
    assert len(ex["input_ids"]) == 40
    assert ex["labels"].count(-100) == len("explain: ") + 21


def test_each_trace_gives_a_predict_and_an_explain_example():
    rows = [{"question": "Anna has 5 apples?", "gold": "8", "pred_answer": "8",
             "rationale": "5 + 3 = 8."}]
    (ex,) = build_examples(rows, CharTokenizer(), 128)
    assert task_prompt("predict", "Anna has 5 apples?") == "predict: Anna has 5 apples?\n"
    pred_target = [t for t in ex["pred_labels"] if t != -100]
    assert len(pred_target) == len("8") + 1
    assert len([t for t in ex["expl_labels"] if t != -100]) == len("5 + 3 = 8.") + 1
    batch = PairCollator(0)([ex, ex])
    assert batch["pred_input_ids"].shape == (2, len(ex["pred_input_ids"]))
    assert batch["expl_attention_mask"].sum().item() == 2 * len(ex["expl_input_ids"])


def test_masked_ce_ignores_masked_positions():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[-100, 3, -100, 5]])
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([3, 5]))
    assert torch.allclose(masked_ce(logits, labels), expected)


@pytest.fixture
def tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                              "v_proj"],
                                            task_type="CAUSAL_LM"))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_is_the_alpha_mix_of_the_two_tasks(tiny_lora_model, alpha, tmp_path):
    from transformers import TrainingArguments

    rows = [{"question": f"q{i}", "gold": str(i), "pred_answer": str(i),
             "rationale": f"{i} + 0 = {i}."} for i in range(4)]
    feats = build_examples(rows, CharTokenizer(), 64)
    batch = PairCollator(0)(feats)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             remove_unused_columns=False)
    trainer = DSSTrainer(model=tiny_lora_model, args=args, alpha=alpha)
    loss = trainer.compute_loss(tiny_lora_model, batch)
    with torch.no_grad():
        lp = masked_ce(tiny_lora_model(input_ids=batch["pred_input_ids"],
                                       attention_mask=batch["pred_attention_mask"]).logits,
                       batch["pred_labels"])
        le = masked_ce(tiny_lora_model(input_ids=batch["expl_input_ids"],
                                       attention_mask=batch["expl_attention_mask"]).logits,
                       batch["expl_labels"])
    assert torch.allclose(loss, alpha * lp + (1 - alpha) * le, atol=1e-6)


def test_training_moves_lora_weights_only(tiny_lora_model, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    rows = [{"question": f"q{i}", "gold": str(i), "pred_answer": str(i),
             "rationale": f"{i} + 0 = {i}."} for i in range(8)]
    feats = build_examples(rows, CharTokenizer(), 64)
    before = {n: p.detach().clone() for n, p in tiny_lora_model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             remove_unused_columns=False, max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = DSSTrainer(model=tiny_lora_model, args=args, alpha=0.5,
                         train_dataset=Dataset.from_list(feats), data_collator=PairCollator(0))
    trainer.train()
    for name, p in tiny_lora_model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if "lora_B" in name:
            assert moved, name
        elif "lora_" not in name:
            assert not moved, name
    logged = [h for h in trainer.state.log_history if "loss_predict" in h]
    assert logged and "loss_explain" in logged[0]


def test_lora_targets_that_do_not_exist_are_named(embedded_path):
    from trainer.model import lora_student

    with pytest.raises(ValueError, match="not modules of the student"):
        lora_student(embedded_path, TrainConfig(lora_targets=["qkv_proj"]))


def test_kd_refuses_a_student_with_another_tokenizer_and_falls_back_when_unusable(
        tmp_path, embedded_path, capsys):
    from pipeline import store
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, tokenizer_fingerprint
    from stages.train import target_plan

    tok = load_tokenizer(embedded_path)
    cfg = load_config("configs/demo.yaml", ["train.kd_lam=0.3"])
    facts = {"teacher": "big-teacher", "tokenizer_fingerprint": "0123456789abcdef",
             "vocab_size": 151936, "k": 20, "usable_for_kd": True}
    (tmp_path / "generate").mkdir()
    store.write_manifest(tmp_path / "generate", {"facts": facts})
    with pytest.raises(ValueError) as err:
        target_plan(cfg, tmp_path, tok)
    text = str(err.value)
    assert "big-teacher" in text and "0123456789abcdef" in text
    assert tokenizer_fingerprint(tok) in text and "train.kd_lam=0" in text
    # same tokenizer: KD on; not usable (an API without ids): text only, and it says why
    facts["tokenizer_fingerprint"], facts["vocab_size"] = tokenizer_fingerprint(tok), len(tok)
    store.write_manifest(tmp_path / "generate", {"facts": facts})
    assert target_plan(cfg, tmp_path, tok) == (True, 0.3)
    facts.update(usable_for_kd=False, kd_unusable_because="40 sampled tokens have no id")
    store.write_manifest(tmp_path / "generate", {"facts": facts})
    assert target_plan(cfg, tmp_path, tok) == (False, 0.0)
    assert "40 sampled tokens have no id" in capsys.readouterr().err
    # asking for the teacher's tokens when its ids do not spell its text is an error
    tokens = load_config("configs/demo.yaml", ["train.explain_targets=tokens"])
    with pytest.raises(ValueError, match="explain_targets=auto"):
        target_plan(tokens, tmp_path, tok)


def test_explain_targets_follow_the_tokenizer(tmp_path, embedded_path):
    """auto: the teacher's tokens when the student shares its tokenizer, else the text (no
    error: text-only training needs nothing of the teacher's); tokens with another tokenizer
    is refused; text always text; KD with text targets is a config error."""
    from pipeline import store
    from pipeline.config import ConfigError, load_config
    from pipeline.models import load_tokenizer, tokenizer_fingerprint
    from stages.train import target_plan

    tok = load_tokenizer(embedded_path)
    facts = {"teacher": "t", "tokenizer_fingerprint": tokenizer_fingerprint(tok),
             "vocab_size": len(tok), "k": 0, "usable_for_kd": True}
    (tmp_path / "generate").mkdir()
    store.write_manifest(tmp_path / "generate", {"facts": facts})
    auto = load_config("configs/demo.yaml", [])
    text = load_config("configs/demo.yaml", ["train.explain_targets=text"])
    tokens = load_config("configs/demo.yaml", ["train.explain_targets=tokens"])
    assert target_plan(auto, tmp_path, tok) == (True, 0.0)
    assert target_plan(text, tmp_path, tok) == (False, 0.0)
    kd_without_topk = load_config("configs/demo.yaml", ["train.kd_lam=0.5"])
    assert target_plan(kd_without_topk, tmp_path, tok) == (True, 0.0)
    facts["tokenizer_fingerprint"] = "another"
    store.write_manifest(tmp_path / "generate", {"facts": facts})
    assert target_plan(auto, tmp_path, tok) == (False, 0.0)
    with pytest.raises(ValueError, match="share the teacher's tokenizer"):
        target_plan(tokens, tmp_path, tok)
    with pytest.raises(ConfigError, match="explain_targets=text cannot carry KD"):
        load_config("configs/demo.yaml", ["train.explain_targets=text", "train.kd_lam=0.5"])
    with pytest.raises(ConfigError, match="train.name"):
        load_config("configs/demo.yaml", ["train.name=../x"])
