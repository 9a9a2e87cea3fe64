"""The command line: one `error:` line and an exit code that says what kind of problem."""

from stages.commands.cli import main
from stages.commands.compare import main as compare_main


def test_bad_config_is_exit_2_and_missing_input_is_exit_1(tmp_path, capsys):
    runs = str(tmp_path)
    assert main(["filter", "--runs-dir", runs, "--run", "r", "filter.min_stepz=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'filter.min_stepz'" in err and "min_steps" in err
    assert main(["train", "--runs-dir", runs, "--run", "r"]) == 1
    assert "run `make filter` for this run first" in capsys.readouterr().err


def test_compare_reports_errors_the_same_way(tmp_path, capsys):
    assert compare_main(["--runs-dir", str(tmp_path), "--run", "r", "--seeds", "0",
                         "train.alpha=3"]) == 2
    assert "train.alpha" in capsys.readouterr().err
