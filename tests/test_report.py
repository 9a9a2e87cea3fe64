"""`make sweep` and `make report` on a small real run (imported traces, a tiny T5 student),
and the report as a person sees it: opened in headless Chromium, its plots rendered."""

import json
import re
import shutil
import subprocess

import pytest

from stages.commands.cli import main as cli

pytestmark = pytest.mark.slow  # the whole pipeline on a tiny student, four times

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def _browser_dom(path, fragment=""):
    """The page's DOM after Chromium has loaded it and run its scripts."""
    out = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom",
                          f"file://{path}{fragment}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def swept_run(tiny_t5, tmp_path_factory):
    """Imported traces (one with wrong arithmetic, one without an answer), filtered, the
    sweep's four students (answer-only and DSS at 50% and 100%) trained and scored."""
    from stages.commands import sweep

    tmp = tmp_path_factory.mktemp("report")
    rows = [{"question": f"Tom has {a} apples. He gets {b} more. How many now?",
             "rationale": f"{a} + {b} = {a + b}.", "answer": str(a + b)}
            for a in range(2, 10) for b in (1, 2)]
    rows[0]["rationale"] = "2 + 1 = 4."
    rows[1] = {"question": rows[1]["question"], "completion": "No idea."}
    (tmp / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    settings = [f"train.student={tiny_t5}", "train.epochs=1", "train.batch_size=4",
                "train.dtype=float32", "train.logging_steps=1", "eval.n=6",
                "eval.dtype=float32", "eval.max_new_tokens=8", "task.n_test=6"]
    assert cli(["import", "--run", "r", "--runs-dir", str(tmp), "--kind", "table", "--from",
                str(tmp / "t.jsonl"), *settings]) == 0
    assert sweep.main(["--run", "r", "--runs-dir", str(tmp), "--shares", "0.5,1",
                       "--seeds", "0", *settings]) == 0
    # make compare on the same run reuses the sweep's students at 100%
    from stages.commands import compare

    before = (tmp / "r" / "train-dss-s0" / "manifest.json").read_text()

    assert compare.main(["--run", "r", "--runs-dir", str(tmp), "--seeds", "0", "--variants",
                         "answer-only,dss", *settings, "eval.systems=[base]"]) == 0
    assert (tmp / "r" / "train-dss-s0" / "manifest.json").read_text() == before
    return tmp / "r"


def test_the_sweep_trains_each_share_and_plots_accuracy_against_it(swept_run):
    out = json.loads((swept_run / "sweep.json").read_text())
    assert [(r["method"], r["share"]) for r in out["rows"]] == [
        ("answer-only", 0.5), ("answer-only", 1.0), ("dss", 0.5), ("dss", 1.0)]
    half, full = out["rows"][2]["traces"], out["rows"][3]["traces"]
    assert 0 < half < full == 14  # 16 imported, 2 rejected by the filter
    steps = {n: json.loads((swept_run / f"train-{n}" / "manifest.json").read_text())
             ["counters"]["steps"] for n in ("dss-p50-s0", "dss-s0")}
    assert steps["dss-p50-s0"] < steps["dss-s0"]  # the same epochs: steps follow the data
    assert (swept_run / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                    "(apt-get install chromium)")
def test_the_report_renders_its_plots_in_a_real_browser(swept_run):
    assert cli(["report", "--run", "r", "--runs-dir", str(swept_run.parent)]) == 0
    page = swept_run / "report.html"
    dom = _browser_dom(page)
    assert 'data-ready="1"' in dom, "the page's script did not run"
    rendered = dict(re.findall(r'data-plot="(\w+)"[^>]*data-rendered="([^"]+)"', dom))
    assert set(rendered) >= {"accuracy", "sweep", "losses", "funnel"}
    for name, size in rendered.items():
        width, height = map(int, size.split("x"))  # "failed" would not parse
        assert width > 200 and height > 100, (name, size)
    assert 'class="missing"' not in dom  # the note a plot that failed to load leaves
    # the accuracy table (compare's students, both modes), the comparison with the two
    # modes' agreement, the sweep's table; examples kept and rejected
    for text in ("answer-only-s0 (predict:)", "dss-s0 (explain:)", "base student",
                 "explain only", "50%", "Examples kept", "wrong_arithmetic",
                 "questions covered", "question coverage: 14 of 16 training questions"):
        assert text in dom, text
    # the table of rejected traces, opened filtered by a link
    shown = re.search(r'id="shown">(\d+)<', _browser_dom(page, "#reason=no_answer")).group(1)
    assert shown == "1"
    assert re.search(r'id="shown">(\d+)<', dom).group(1) == "2"
