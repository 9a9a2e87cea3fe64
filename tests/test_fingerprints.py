"""Fingerprints are pinned: what decides each stage's output, for the shipped configs and
many variants of them, hashes to what it did when these values were recorded (commit b23c416,
before settings declared their own part in the fingerprint). A change here means every user's
finished stages would be redone (an API teacher paid again, every student retrained): it must
be on purpose, with a new format version, never by accident."""

import pytest

from pipeline.config import load_config
from pipeline.fingerprints import fingerprint
from pipeline.run_folder import RunFolder
from stages.filter.stage import filter_fingerprinted
from stages.generate.stage import generate_fingerprinted
from stages.train.stage import train_fingerprinted
from trainer.students.causal_lm import CausalLMStudent

FIXTURE = "tests/fixtures/run-before-house"

DEMO, GSM8K = "configs/demo.yaml", "configs/gsm8k.yaml"
CASES = {
    "demo": (DEMO, []),
    "gsm8k": (GSM8K, []),
    "demo-hf": (DEMO, ["generate.backend=hf"]),
    "demo-openai": (DEMO, ["generate.backend=openai",
        "generate.base_url=http://127.0.0.1:8000/v1", "generate.tokenizer=x"]),
    "demo-openai-completions": (DEMO, ["generate.backend=openai", "generate.endpoint=completions"]),
    "demo-ray": (DEMO, ["generate.executor=ray", "generate.workers=3", "generate.batch_size=8",
        "generate.shard_format=1", "vllm.max_num_seqs=4", "filter.executor=ray",
        "filter.workers=2", "filter.plot=false"]),
    "kd": (DEMO, ["train.kd_lam=0.5", "train.kd_temperature=2", "train.kd_tail=renormalize"]),
    "answer-kd": (DEMO, ["train.answer_kd_lam=0.3", "train.answer_kd_temperature=3"]),
    "cosine": (DEMO, ["train.rationale_loss=cosine", "train.cosine_margin=0.1"]),
    "consistency": (DEMO, ["train.consistency_lam=0.5", "train.consistency_noise=dropout"]),
    "fraction": (DEMO, ["train.data_fraction=0.25", "train.heldout_share=0.1",
        "train.eval_steps=7"]),
    "args": (DEMO, ["train.args.optim=adafactor", "train.name=x", "train.report_to=[]"]),
    "off-knobs": (DEMO, ["train.answer_kd_temperature=5", "train.cosine_margin=0.2",
        "train.consistency_amount=0.3", "train.eval_steps=3", "train.kd_beta=0.5"]),
    "filter": (DEMO, ["filter.extractors=[answer_is,last_number]", "filter.dedup=exact"]),
    "file-label": (DEMO, ["task.kind=file", "task.train_path=x.jsonl", "task.answer_type=label"]),
}

PINNED = {
    "demo": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "0cf3676e72053af2"
    },
    "gsm8k": {
        "generate": "37b14c79d9d13fa9",
        "filter": "6f33d2e3d6ecae5a",
        "train": "7075460bd081f5e0"
    },
    "demo-hf": {
        "generate": "b4727a7a5d694d96",
        "filter": "5dccccfcb6511df5",
        "train": "0cf3676e72053af2"
    },
    "demo-openai": {
        "generate": "037365f7dd0ec1c6",
        "filter": "5dccccfcb6511df5",
        "train": "0cf3676e72053af2"
    },
    "demo-openai-completions": {
        "generate": "f489c16d40821f3e",
        "filter": "5dccccfcb6511df5",
        "train": "0cf3676e72053af2"
    },
    "demo-ray": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "0cf3676e72053af2"
    },
    "kd": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "594ce6b6746193f5"
    },
    "answer-kd": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "a6bbdff6ce619e48"
    },
    "cosine": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "38b38c1e86d1adca"
    },
    "consistency": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "83770b4b5c088533"
    },
    "fraction": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "d5bc9c3b8a4be2e5"
    },
    "args": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "71e11e0b5b75d758"
    },
    "off-knobs": {
        "generate": "1ac2a84b0c086223",
        "filter": "5dccccfcb6511df5",
        "train": "0cf3676e72053af2"
    },
    "filter": {
        "generate": "1ac2a84b0c086223",
        "filter": "2dc26a1db5af8d9f",
        "train": "0cf3676e72053af2"
    },
    "file-label": {
        "generate": "1ac2a84b0c086223",
        "filter": "7a63ab88e49f4eb8",
        "train": "0cf3676e72053af2"
    }
}


@pytest.mark.parametrize("name", list(CASES))
def test_fingerprints_are_pinned(name):
    path, overrides = CASES[name]
    cfg = load_config(path, overrides)
    upstream = RunFolder(FIXTURE).stage("filter").manifest()
    found = {"generate": fingerprint(generate_fingerprinted(cfg)),
             "filter": fingerprint(filter_fingerprinted(cfg)),
             "train": fingerprint(train_fingerprinted(cfg, upstream, CausalLMStudent()))}
    assert found == PINNED[name]
