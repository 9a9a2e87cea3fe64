"""What a user sees for bad input: one `error:` line that says what, why and how to fix it, no
traceback, and no run folder left behind by the failed command (the README's table, row by
row), and a CLI that helps: --help with defaults and examples, -q / -v, an installed
`distill` that works outside the repository."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stages.commands.cli import main as cli

REPO = Path(__file__).resolve().parent.parent


def _files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "ok.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n')
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\x81")
    (tmp_path / "bad.parquet").write_text("not parquet")


def _task(name):
    return ["task.kind=file", f"task.train_path={name}", "task.test_path=ok.jsonl",
            "generate.backend=hf"]


# (the README's "bad input" column, the command, what the error line must say)
ROWS = [
    ("a mistyped setting", ["filter", "filter.min_step=2"],
     "unknown key 'filter.min_step'; did you mean 'min_steps'?"),
    ("a config file that is not there", ["filter", "--config", "nope.yaml"],
     "config file 'nope.yaml' does not exist"),
    ("an empty task file", ["generate", *_task("empty.jsonl")], "holds no rows"),
    ("a task file that is not text", ["generate", *_task("binary.jsonl")],
     "is not a valid jsonl file"),
    ("a damaged Parquet task file", ["generate", *_task("bad.parquet")],
     "is not a valid parquet file"),
    ("a task file that is not there", ["generate", *_task("gone.jsonl")],
     "task file 'gone.jsonl' does not exist"),
    ("a stage before its input", ["train"], "no finished filter stage"),
    ("an unknown train.args field", ["train", "train.args.lr_schedular_type=linear"],
     "did you mean 'lr_scheduler_type'"),
    ("exporting a student never trained", ["export"], "no run folder"),
]


@pytest.mark.parametrize("what, args, says", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line_and_leaves_no_run_folder(what, args, says, tmp_path,
                                                              capsys, monkeypatch):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    code = cli([args[0], "--run", "typo", "--runs-dir", str(runs), *args[1:]])
    err = capsys.readouterr().err
    assert code in (1, 2), err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and says in err, err
    assert "Traceback" not in err
    assert not (runs / "typo").exists()


def test_a_mistyped_hub_id_is_one_line(tmp_path):
    """transformers' OSError for a model that is neither a folder nor on the hub (offline
    here, so the answer is immediate) becomes one line naming the setting's value."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "stages.commands.cli", "generate", "--run", "typo",
         "--runs-dir", str(tmp_path / "runs"), "--config", str(REPO / "configs/demo.yaml"),
         "generate.backend=hf", "generate.model=nobody/no-such-model"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert "error: model 'nobody/no-such-model' could not be loaded" in done.stderr
    assert "hub id" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs" / "typo").exists()


def test_help_shows_defaults_and_an_example_for_every_command(capsys):
    from stages.commands.cli import EXAMPLES, build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "examples:\n  distill " + name in text, name
        assert "-q, --quiet" in text and "-v, --verbose" in text
    assert "(default: configs/demo.yaml)" in commands["filter"].format_help()
    assert "(default: float32)" in commands["export"].format_help()


def test_quiet_and_verbose(tmp_path, capsys):
    from pipeline.log import LOGGER, debug, log, set_verbosity

    try:
        set_verbosity(-1)
        log("filter", "an info line")
        assert capsys.readouterr().err == ""
        assert os.environ.get("TQDM_DISABLE") == "1"
        set_verbosity(1)
        assert "TQDM_DISABLE" not in os.environ
        debug("filter", "a debug line")
        assert capsys.readouterr().err == "[filter] a debug line\n"
        set_verbosity(0)
        debug("filter", "hidden")
        log("filter", "shown")
        assert capsys.readouterr().err == "[filter] shown\n"
        # a quiet command prints its errors all the same
        assert cli(["filter", "-q", "--run", "x", "--runs-dir", str(tmp_path)]) == 1
        assert "error: no finished generate stage" in capsys.readouterr().err
    finally:
        set_verbosity(0)
    assert LOGGER.level == 20 and "TQDM_DISABLE" not in os.environ


def test_an_installed_distill_works_outside_the_repository(tmp_path, monkeypatch):
    """The wheel (built from this checkout) holds the configs and prompts; unpacked apart
    from the repository and run from an empty folder, `distill --help`, `distill config
    --keys` and `distill config` (the shipped demo config) work."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = wheels.glob("stepdistill-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "pipeline/resources/configs/demo.yaml").is_file()
    assert (site / "pipeline/resources/data/prompts/add_subtract_cot.txt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    for args, says in ((["--help"], "start here:"), (["config", "--keys"], "train.args = {}"),
                       (["config"], "prompt_template: data/prompts/add_subtract_cot.txt")):
        done = subprocess.run([sys.executable, "-c", "import sys; from stages.commands.cli "
                               "import main; sys.exit(main())", *args], cwd=empty, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert says in done.stdout, args
    import_check = subprocess.run(  # the unpacked wheel's code ran, not the checkout's
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=empty,
        env=env, capture_output=True, text=True, timeout=60)
    assert import_check.stdout.startswith(str(site))
    from pipeline.prompts import PromptTemplate

    monkeypatch.chdir(empty)  # a relative template path is found in the package
    assert "{question}" not in PromptTemplate("data/prompts/add_subtract_cot.txt").render("q")
