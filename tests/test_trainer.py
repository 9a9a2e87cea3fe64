import pytest
import torch

from trainer.settings import TrainConfig
from trainer.dss import DSSTrainer
from trainer.examples import DSSCollator, build_examples, task_prompt
from trainer.losses import terms_from_settings
from trainer.students.causal_lm import CausalLMStudent

STUDENT = CausalLMStudent()


class CharTokenizer:
    """A real (if tiny) tokenizer: one id per character, eos = 0."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 120 + 1 for c in text]}


def _fast_tokenizer():
    """A transformers tokenizer object for the trainer's `processing_class` (the examples
    are tokenised by `CharTokenizer` beforehand)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1}, unk_token="<unk>")),
        eos_token="<eos>", pad_token="<eos>")


def _trainer(model, tmp_path, terms, feats, **args):
    """The trainer as the train stage makes it (TRL's SFTConfig, our examples)."""
    from datasets import Dataset
    from trl import SFTConfig

    config = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                       remove_unused_columns=False, bf16=False, gradient_checkpointing=False,
                       dataset_kwargs={"skip_prepare_dataset": True}, **args)
    return DSSTrainer(model=model, args=config, student=STUDENT, terms=terms,
                      processing_class=_fast_tokenizer(), train_dataset=Dataset.from_list(feats),
                      data_collator=DSSCollator(STUDENT, 0))


def _ids(text):
    return CharTokenizer()(text)["input_ids"]


def _rows(n):
    return [{"question": f"q{i}", "gold": str(i), "pred_answer": str(i),
             "rationale": f"{i} + 0 = {i}."} for i in range(n)]


def test_prompt_tokens_are_masked_and_targets_end_with_eos():
    ex = STUDENT.encode(_ids("predict: q\n"), _ids("42") + [0], max_length=64)
    n_prompt = len("predict: q\n")
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["labels"][-1] == 0 and len(ex["input_ids"]) == n_prompt + 3


def test_truncation_keeps_the_prompt_mask_exact():
    ex = STUDENT.encode(_ids("explain: " + "x" * 20 + "\n"), _ids("y" * 100) + [0],
                        max_length=40)
    assert len(ex["input_ids"]) == 40
    assert ex["labels"].count(-100) == len("explain: ") + 21


def test_each_trace_gives_a_predict_and_an_explain_example():
    rows = [{"question": "Anna has 5 apples?", "gold": "8", "pred_answer": "8",
             "rationale": "5 + 3 = 8."}]
    (ex,) = build_examples(rows, CharTokenizer(), STUDENT, 128)
    assert task_prompt("predict", "Anna has 5 apples?") == "predict: Anna has 5 apples?\n"
    assert len([t for t in ex["predict"]["labels"] if t != -100]) == len("8") + 1
    assert len([t for t in ex["explain"]["labels"] if t != -100]) == len("5 + 3 = 8.") + 1
    batch = DSSCollator(STUDENT, 0)([ex, ex])
    assert batch["predict"]["input_ids"].shape == (2, len(ex["predict"]["input_ids"]))
    assert batch["explain"]["attention_mask"].sum().item() == 2 * len(ex["explain"]["input_ids"])


def test_labelled_questions_give_the_predict_examples_and_the_traces_the_explain_ones():
    """train.predict_on=labelled: one predict: example per labelled question, one explain:
    per kept trace, paired into as many records as the longer list (the shorter cycled)."""
    from trainer.examples import pair_cycled, predict_example

    tok = CharTokenizer()
    questions = [{"id": f"q{i}", "question": f"q{i}", "gold": str(i)} for i in range(5)]
    predicts = [predict_example(r, tok, STUDENT, 64) for r in questions]
    explains = [e["explain"] for e in build_examples(_rows(2), tok, STUDENT, 64)]
    records = pair_cycled(predicts, explains)
    assert len(records) == 5
    assert [r["predict"] for r in records] == predicts
    assert [r["explain"] for r in records] == explains * 2 + explains[:1]
    assert predicts[3]["input_ids"][-2:] == _ids("3") + [0]
    assert len(pair_cycled(predicts[:1], explains)) == 2 and pair_cycled([], explains) == []
    with pytest.raises(Exception, match="answer KD needs the teacher's answer tokens"):
        TrainConfig(predict_on="labelled", answer_kd_lam=0.5)


def test_hinted_traces_give_no_top_k_rows_unless_asked(embedded_path):
    """A hinted trace's stored top-k saw the answer in the prompt: KD leaves it out
    (empty rows) unless train.kd_hinted; its cross-entropy targets are those of any trace."""
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(embedded_path)
    completion = " 5 + 3 = 8. The answer is 8."
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    row = {"question": "Anna has 5 apples and buys 3. How many?", "gold": "8",
           "pred_answer": "8", "rationale": "5 + 3 = 8.", "completion": completion,
           "token_ids": ids, "topk_ids": [[i, i + 1] for i in ids],
           "topk_logprobs": [[-0.1, -2.0] for _ in ids]}
    plain, hinted, asked = (
        build_examples([dict(row, hinted=h)], tok, STUDENT, 128, teacher_tokens=True,
                       with_topk=True, topk_hinted=k)[0]["explain"]
        for h, k in ((False, False), (True, False), (True, True)))
    assert plain["labels"] == hinted["labels"] == asked["labels"]
    assert any(r[0] >= 0 for r in plain["topk_ids"]) and plain["topk_ids"] == asked["topk_ids"]
    assert all(r == [-1, -1] for r in hinted["topk_ids"])
    assert len(hinted["topk_ids"]) == len(plain["topk_ids"])


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


def _reference_ce(model, examples):
    """Each example alone, unpadded, through the full logits: the mean next-token
    cross-entropy over every target of the batch."""
    losses = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor(ex["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        losses.append(torch.nn.functional.cross_entropy(logits[keep], labels[keep],
                                                        reduction="none"))
    return torch.cat(losses).mean()


def test_target_logits_of_a_padded_batch_are_each_sequence_alone(tiny_lora_model):
    """Left padding with position ids and `logits_to_keep`: the logits at every target are
    those of the sequence run alone, in row-major order."""
    examples = [ex["explain"] for ex in build_examples(
        [{"question": "q" * n, "gold": "1", "pred_answer": "1", "rationale": "r" * (9 - n)}
         for n in (1, 5, 9)], CharTokenizer(), STUDENT, 64)]
    batch = STUDENT.collate(examples, 0)
    with torch.no_grad():
        logits, targets = STUDENT.target_logits(tiny_lora_model, batch)
        expected_logits, expected_targets = [], []
        for ex in examples:
            full = tiny_lora_model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            expected_logits.append(full[labels != -100])
            expected_targets.append(labels[labels != -100])
    assert torch.equal(targets, torch.cat(expected_targets))
    assert torch.allclose(logits, torch.cat(expected_logits), atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_is_the_alpha_mix_of_the_two_tasks(tiny_lora_model, alpha, tmp_path):
    feats = build_examples(_rows(4), CharTokenizer(), STUDENT, 64)
    batch = DSSCollator(STUDENT, 0)(feats)
    trainer = _trainer(tiny_lora_model, tmp_path, terms_from_settings(TrainConfig(alpha=alpha)),
                       feats)
    loss = trainer.compute_loss(tiny_lora_model, batch)
    with torch.no_grad():
        lp = _reference_ce(tiny_lora_model, [f["predict"] for f in feats])
        le = _reference_ce(tiny_lora_model, [f["explain"] for f in feats])
    assert torch.allclose(loss, alpha * lp + (1 - alpha) * le, atol=1e-5)


def test_the_loss_goes_through_the_wrapped_model(tiny_lora_model, tmp_path):
    """Under DistributedDataParallel (gloo, one process) every forward goes through the
    wrapper, and the gradients are those of the bare model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from stages.backends.vllm_server import free_port

    feats = build_examples(_rows(3), CharTokenizer(), STUDENT, 64)
    batch = DSSCollator(STUDENT, 0)(feats)
    trainer = _trainer(tiny_lora_model, tmp_path, terms_from_settings(TrainConfig(alpha=0.4)),
                       feats)
    trainer.compute_loss(tiny_lora_model, batch).backward()
    bare = {n: p.grad.clone() for n, p in tiny_lora_model.named_parameters() if p.requires_grad}
    tiny_lora_model.zero_grad()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        wrapped = DistributedDataParallel(tiny_lora_model)
        trainer.compute_loss(wrapped, batch).backward()
    finally:
        dist.destroy_process_group()
    for name, p in tiny_lora_model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, bare[name], atol=1e-6), name


def test_training_moves_lora_weights_only(tiny_lora_model, tmp_path):
    feats = build_examples(_rows(8), CharTokenizer(), STUDENT, 64)
    before = {n: p.detach().clone() for n, p in tiny_lora_model.named_parameters()}
    trainer = _trainer(tiny_lora_model, tmp_path, terms_from_settings(TrainConfig(alpha=0.5)),
                       feats, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                       save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer.train()
    for name, p in tiny_lora_model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        if "lora_B" in name:
            assert moved, name
        elif "lora_" not in name:
            assert not moved, name
    logged = [h for h in trainer.state.log_history if "loss_predict" in h]
    assert logged and "loss_explain" in logged[0]


def test_the_terms_follow_the_settings_and_the_warm_up_is_a_weight_schedule():
    def weights(step=10**6, **kw):
        return {t.name: round(t.weight_at(step), 6)
                for t in terms_from_settings(TrainConfig(**kw))}

    assert weights() == {"predict": 0.5, "explain": 0.5}
    assert weights(alpha=1.0) == {"predict": 1.0}
    assert weights(alpha=0.2, kd_lam=0.25) == {"predict": 0.2, "explain": 0.6, "kd": 0.2}
    warm = dict(alpha=0.5, kd_lam=0.5, explain_warmup_steps=10)
    assert weights(0, **warm) == {"predict": 0.5, "explain": 0.0, "kd": 0.0}
    assert weights(5, **warm) == {"predict": 0.5, "explain": 0.125, "kd": 0.125}
    first = dict(alpha=0.5, answer_kd_lam=0.5, predict_warmup_steps=4)  # rationales first
    assert weights(0, **first) == {"predict": 0.0, "answer_kd": 0.0, "explain": 0.5}
    assert weights(1, **first) == {"predict": 0.0625, "answer_kd": 0.0625, "explain": 0.5}
    assert weights(9, **first) == {"predict": 0.25, "answer_kd": 0.25, "explain": 0.5}


def _readme_loss_term_example() -> str:
    """The code block of the README's "Adding a loss term"."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("**Adding a loss term.**"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n\n")]


def test_a_new_loss_term_is_one_class_and_one_setting(tiny_lora_model, tmp_path):
    """The README's example, run as written there: a term in a file of its own, switched on
    by a setting."""
    import dataclasses

    from trainer.losses.base import TERMS

    example = _readme_loss_term_example()
    assert len([ln for ln in example.splitlines() if ln.strip()]) <= 16
    try:
        exec(compile(example, "README.md", "exec"), {})  # registers PredictEntropy
        @dataclasses.dataclass
        class Settings(TrainConfig):  # the new setting, as a field of the train section
            entropy_weight: float = 0.0

        assert "predict_entropy" not in {t.name for t in terms_from_settings(Settings())}
        terms = terms_from_settings(Settings(alpha=0.5, entropy_weight=0.1))
        assert sorted(t.name for t in terms) == ["explain", "predict", "predict_entropy"]
        feats = build_examples(_rows(4), CharTokenizer(), STUDENT, 64)
        batch = DSSCollator(STUDENT, 0)(feats)
        with_term = _trainer(tiny_lora_model, tmp_path, terms, feats)
        without = _trainer(tiny_lora_model, tmp_path,
                           [t for t in terms if t.name != "predict_entropy"], feats)
        with torch.no_grad():
            logits = STUDENT.target_logits(tiny_lora_model, batch["predict"])[0].float()
            logp = logits.log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1).mean()
            diff = with_term.compute_loss(tiny_lora_model, batch) - without.compute_loss(
                tiny_lora_model, batch)
        assert torch.allclose(diff, 0.1 * entropy, atol=1e-5)
        assert with_term._logged["loss_predict_entropy"]
    finally:
        TERMS.unregister("predict_entropy")


def test_lora_targets_that_do_not_exist_are_named(embedded_path):
    from trainer.lora import lora_student

    with pytest.raises(ValueError, match="not modules of the student"):
        lora_student(embedded_path, TrainConfig(lora_targets=["qkv_proj"]), STUDENT)


def test_kd_refuses_a_student_with_another_tokenizer_and_falls_back_when_unusable(
        embedded_path, capsys):
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, tokenizer_fingerprint
    from stages.train.stage import target_plan

    tok = load_tokenizer(embedded_path)
    cfg = load_config("configs/demo.yaml", ["train.kd_lam=0.3"])
    facts = {"teacher": "big-teacher", "tokenizer_fingerprint": "0123456789abcdef",
             "vocab_size": 151936, "k": 20, "usable_for_kd": True}
    with pytest.raises(ValueError) as err:
        target_plan(cfg, facts, tok)
    text = str(err.value)
    assert "big-teacher" in text and "0123456789abcdef" in text
    assert tokenizer_fingerprint(tok) in text and "train.kd_lam=0" in text
    # same tokenizer: KD on; not usable (an API without ids): text only, and it says why
    facts["tokenizer_fingerprint"], facts["vocab_size"] = tokenizer_fingerprint(tok), len(tok)
    assert target_plan(cfg, facts, tok) == (True, 0.3)
    facts.update(usable_for_kd=False, kd_unusable_because="40 sampled tokens have no id")
    assert target_plan(cfg, facts, tok) == (False, 0.0)
    assert "40 sampled tokens have no id" in capsys.readouterr().err
    # asking for the teacher's tokens when its ids do not spell its text is an error
    tokens = load_config("configs/demo.yaml", ["train.explain_targets=tokens"])
    with pytest.raises(ValueError, match="explain_targets=auto"):
        target_plan(tokens, facts, tok)


def test_explain_targets_follow_the_tokenizer(embedded_path):
    """auto: the teacher's tokens when the student shares its tokenizer, else the text (no
    error: text-only training needs nothing of the teacher's); tokens with another tokenizer
    is refused; text always text; KD with text targets is a config error."""
    from pipeline.config import ConfigError, load_config
    from pipeline.models import load_tokenizer, tokenizer_fingerprint
    from stages.train.stage import target_plan

    tok = load_tokenizer(embedded_path)
    facts = {"teacher": "t", "tokenizer_fingerprint": tokenizer_fingerprint(tok),
             "vocab_size": len(tok), "k": 0, "usable_for_kd": True}
    auto = load_config("configs/demo.yaml", [])
    text = load_config("configs/demo.yaml", ["train.explain_targets=text"])
    tokens = load_config("configs/demo.yaml", ["train.explain_targets=tokens"])
    assert target_plan(auto, facts, tok) == (True, 0.0)
    assert target_plan(text, facts, tok) == (False, 0.0)
    kd_without_topk = load_config("configs/demo.yaml", ["train.kd_lam=0.5"])
    assert target_plan(kd_without_topk, facts, tok) == (True, 0.0)
    facts["tokenizer_fingerprint"] = "another"
    assert target_plan(auto, facts, tok) == (False, 0.0)
    with pytest.raises(ValueError, match="share the teacher's tokenizer"):
        target_plan(tokens, facts, tok)
    with pytest.raises(ConfigError, match="explain_targets=text cannot carry KD"):
        load_config("configs/demo.yaml", ["train.explain_targets=text", "train.kd_lam=0.5"])
    with pytest.raises(ConfigError, match="train.name"):
        load_config("configs/demo.yaml", ["train.name=../x"])
    # the same checks hold for settings built in code
    with pytest.raises(ConfigError, match="explain_targets=text cannot carry KD"):
        TrainConfig(explain_targets="text", kd_lam=0.5)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_shipped_accelerate_configs_are_read_by_accelerate(name):
    """The configs/accelerate examples parse (accelerate refuses unknown keys); ddp.yaml is also
    launched for real in tests/test_scale.py."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(f"configs/accelerate/{name}.yaml")
    assert config.num_processes == 2 and config.distributed_type.name == {
        "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}[name]
